// A new account's one-time pre-keys, generated, "uploaded" and consumed by
// Baileys' own code, for the key-retention tests (docs/key-retention.md).
//
//   1. initAuthCreds() and an in-memory key store wrapped in Baileys'
//      addTransactionCapability (what makeWASocket does with auth.keys).
//   2. The upload of Socket/socket.js uploadPreKeys: inside keys.transaction,
//      getNextPreKeysNode({ creds, keys }, INITIAL_PREKEY_COUNT), then the
//      creds.update it returns applied to creds (what saveCreds persists).
//      The node is the <iq xmlns="encrypt" type="set"> Baileys would send.
//   3. <consume> new contacts, each with its own initAuthCreds() and
//      signal repository: the server answers a contact's key fetch with
//      one pre-key of the uploaded list (a <user> node built from our upload
//      node's children), the contact injects it with Baileys'
//      parseAndInjectE2ESessions and sends a pkmsg; our repository (the one
//      makeWASocket builds: DEFAULT_CONNECTION_CONFIG.makeSignalRepository,
//      i.e. makeLibSignalRepository, over the same key store) runs
//      decryptMessage decrypts it, and libsignal's decryptPreKeyWhisperMessage
//      calls the store's removePreKey (Signal/libsignal.js), which is
//      keys.set({ 'pre-key': { [id]: null } }): the consumed pre-key leaves
//      the store.  Our store then also holds the session and identity key
//      Baileys wrote for each contact.
//   4. Optionally <pending> pre-keys generated with generateOrGetPreKeys but
//      not uploaded: nextPreKeyId moves, firstUnuploadedPreKeyId does not.
//      On a copy of the state, getNextPreKeysNode(MIN_PREKEY_COUNT) shows
//      which ids the next upload reads back.
//
// Prints one JSON object: creds and every key as Baileys' stores write them
// (JSON.stringify with BufferJSON.replacer), plus what happened:
//   {"creds": {...}, "keys": [{"type", "id", "value"}], "uploaded": [ids],
//    "consumed": [ids], "pending": [ids], "next_upload": [ids], "contacts": [jids]}
//
// usage: node prekeys.mjs <consume> [<pending>]   (run from tests/compat)
import { randomBytes } from 'node:crypto'
import {
  addTransactionCapability, BufferJSON, DEFAULT_CONNECTION_CONFIG, generateOrGetPreKeys, getBinaryNodeChild,
  getBinaryNodeChildren, getNextPreKeysNode, initAuthCreds, INITIAL_PREKEY_COUNT, MIN_PREKEY_COUNT,
  parseAndInjectE2ESessions
} from '@whiskeysockets/baileys'

const { makeSignalRepository } = DEFAULT_CONNECTION_CONFIG // makeLibSignalRepository

const consume = Number(process.argv[2] ?? 0)
const pending = Number(process.argv[3] ?? 0)
if (!Number.isInteger(consume) || consume < 0 || !Number.isInteger(pending) || pending < 0) {
  console.error('usage: node prekeys.mjs <consume> [<pending>]')
  process.exit(2)
}

const logger = {
  level: 'silent',
  trace () {}, debug () {}, info () {}, warn () {}, error () {}, fatal () {},
  child () { return logger }
}

// A SignalKeyStore over a Map, like useMultiFileAuthState: null deletes.
function memoryStore (rows = new Map()) {
  const store = {
    rows,
    async get (type, ids) {
      const out = {}
      for (const id of ids) {
        const value = rows.get(`${type}\u0000${id}`)
        if (value !== undefined) out[id] = value
      }
      return out
    },
    async set (data) {
      for (const type in data) {
        for (const id in data[type]) {
          const value = data[type][id]
          if (value === null || value === undefined) rows.delete(`${type}\u0000${id}`)
          else rows.set(`${type}\u0000${id}`, value)
        }
      }
    }
  }
  return store
}

function account (phone, device) {
  const creds = initAuthCreds()
  creds.me = { id: `${phone}:${device}@s.whatsapp.net`, name: `account ${phone}` }
  creds.registered = true
  const store = memoryStore()
  const keys = addTransactionCapability(store, logger, { maxCommitRetries: 1, delayBetweenTriesMs: 0 })
  const repository = makeSignalRepository({ creds, keys }, logger)
  return { creds, store, keys, repository }
}

// Socket/socket.js uploadPreKeys, without the network: generate and save in a
// transaction, apply the creds.update, return the node that would be sent.
async function upload (state, count) {
  const node = await state.keys.transaction(async () => {
    const { update, node } = await getNextPreKeysNode({ creds: state.creds, keys: state.keys }, count)
    Object.assign(state.creds, update)
    return node
  }, 'upload-pre-keys')
  return node
}

const idOf = (keyNode) => Buffer.from(getBinaryNodeChild(keyNode, 'id').content).readUIntBE(0, 3)

const ourPhone = '5511' + String(100000000 + Math.floor(Math.random() * 899999999))
const us = account(ourPhone, 7)
const uploadNode = await upload(us, INITIAL_PREKEY_COUNT)
const uploadedNodes = getBinaryNodeChildren(getBinaryNodeChild(uploadNode, 'list'), 'key')
const uploaded = uploadedNodes.map(idOf)

// The server's answer to a contact's <iq xmlns="encrypt" type="get"><key><user jid=us/>:
// our registration, identity and signed pre-key as uploaded, and one one-time pre-key.
const child = (tag) => getBinaryNodeChild(uploadNode, tag)
function serverBundle (keyNode) {
  return {
    tag: 'iq',
    attrs: { type: 'result' },
    content: [{
      tag: 'list',
      attrs: {},
      content: [{
        tag: 'user',
        attrs: { jid: us.creds.me.id },
        content: [child('registration'), child('type'), child('identity'), child('skey'), keyNode]
      }]
    }]
  }
}

const consumed = []
const contacts = []
for (let i = 0; i < consume; i++) {
  const phone = '5521' + String(100000000 + i)
  const them = account(phone, 0)
  const keyNode = uploadedNodes[i * 7 % uploadedNodes.length] // the server picks; spread them out
  await parseAndInjectE2ESessions(serverBundle(keyNode), them.repository)
  const text = randomBytes(24)
  const { type, ciphertext } = await them.repository.encryptMessage({ jid: us.creds.me.id, data: text })
  if (type !== 'pkmsg') throw new Error(`contact ${i}: expected a pkmsg, got ${type}`)
  const jid = `${phone}@s.whatsapp.net`
  const plain = await us.repository.decryptMessage({ jid, type, ciphertext })
  if (!Buffer.from(plain).equals(text)) throw new Error(`contact ${i}: decrypted text differs`)
  const id = idOf(keyNode)
  if ((await us.store.get('pre-key', [String(id)]))[String(id)] !== undefined) {
    throw new Error(`contact ${i}: pre-key ${id} is still in the store after the pkmsg`)
  }
  consumed.push(id)
  contacts.push(jid)
}

// Pre-keys generated and saved but not uploaded (ids >= firstUnuploadedPreKeyId).
const pendingIds = []
if (pending > 0) {
  const { newPreKeys, lastPreKeyId } = generateOrGetPreKeys(us.creds, pending)
  await us.keys.set({ 'pre-key': newPreKeys })
  us.creds.nextPreKeyId = lastPreKeyId + 1
  pendingIds.push(...Object.keys(newPreKeys).map(Number))
}

// What the next upload would send, computed on a copy of the state.
const copy = {
  creds: { ...us.creds },
  keys: addTransactionCapability(memoryStore(new Map(us.store.rows)), logger,
    { maxCommitRetries: 1, delayBetweenTriesMs: 0 })
}
const nextNode = await upload(copy, MIN_PREKEY_COUNT)
const nextUpload = getBinaryNodeChildren(getBinaryNodeChild(nextNode, 'list'), 'key').map(idOf)

const asStored = (value) => JSON.parse(JSON.stringify(value, BufferJSON.replacer))
const keys = []
for (const [name, value] of us.store.rows) {
  const [type, id] = name.split('\u0000')
  keys.push({ type, id, value: asStored(value) })
}
process.stdout.write(JSON.stringify({
  creds: asStored(us.creds),
  keys,
  uploaded,
  consumed,
  pending: pendingIds,
  next_upload: nextUpload,
  contacts
}) + '\n')
