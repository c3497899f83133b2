// Write a realistic company directory with Baileys itself: initAuthCreds()
// and saveCreds() for creds.json, state.keys.set({...}) for one or more keys
// of every key type, Buffers from crypto.randomBytes (key pairs from Baileys'
// Curve).  Prints what was written, as Baileys holds it in memory, in the
// encoding of lib/dump.mjs:  {"creds": {...}, "keys": {"<type>": {"<id>": value}}}
//
// usage: node write-auth-state.mjs <new company directory>
// Run it from tests/compat so that the pinned Baileys package resolves.
import { randomBytes, randomInt } from 'node:crypto'
import { Curve, initAuthCreds, proto, useMultiFileAuthState } from '@whiskeysockets/baileys'
import { dump } from './lib/dump.mjs'

const dir = process.argv[2]
if (!dir) {
  console.error('usage: node write-auth-state.mjs <new company directory>')
  process.exit(2)
}

const digits = (n) => Array.from({ length: n }, () => randomInt(10)).join('')
const phone = () => '55' + digits(11)
const lid = () => '1' + digits(14)
const b64 = (n) => randomBytes(n).toString('base64')

const { state, saveCreds } = await useMultiFileAuthState(dir)
// a fresh folder: state.creds is initAuthCreds(); make it look paired
const me = phone()
Object.assign(state.creds, initAuthCreds(), {
  me: { id: `${me}:7@s.whatsapp.net`, lid: `${lid()}:7@lid`, name: 'Açaí "Suporte" \\ 24/7 ✓ 🚀' },
  account: {
    details: randomBytes(80),
    accountSignatureKey: randomBytes(32),
    accountSignature: randomBytes(64),
    deviceSignature: randomBytes(64)
  },
  signalIdentities: [{ identifier: { name: `${me}:7@s.whatsapp.net`, deviceId: 0 }, identifierKey: randomBytes(33) }],
  routingInfo: randomBytes(24),
  registered: true,
  platform: 'android',
  myAppStateKeyId: 'AAAAAB7V',
  lastAccountSyncTimestamp: 1760000000,
  nextPreKeyId: 31,
  firstUnuploadedPreKeyId: 31,
  processedHistoryMessages: [{ key: { remoteJid: `${me}@s.whatsapp.net`, fromMe: true, id: '3EB0C0FFEE' }, messageTimestamp: 1760000001 }]
})

const keys = {
  'pre-key': {},
  session: {},
  'sender-key': {},
  'sender-key-memory': {},
  'app-state-sync-key': {},
  'app-state-sync-version': {},
  'lid-mapping': {},
  'device-list': {},
  tctoken: {},
  'identity-key': {}
}
for (let i = 1; i <= 30; i++) keys['pre-key'][String(i)] = Curve.generateKeyPair()
for (let i = 0; i < 8; i++) {
  const addr = i % 2 ? `${lid()}_1.${i}` : `${phone()}.${i}`
  keys.session[addr] = randomBytes(400 + randomInt(1000))
  keys['identity-key'][addr] = Buffer.concat([Buffer.from([5]), randomBytes(32)])
}
for (let i = 0; i < 5; i++) {
  const group = `120363${digits(12)}@g.us`
  keys['sender-key'][`${group}::${lid()}@lid::${i}`] = randomBytes(100 + randomInt(500))
  keys['sender-key-memory'][group] = { [`${phone()}:0@s.whatsapp.net`]: true, [`${lid()}:3@lid`]: true }
}
// ids are base64 key ids; make sure some hold '/' (file names use '__')
const syncIds = ['AAAAAB7V', 'ab/cd+EF', '//8AAQ==', b64(6)]
for (const [i, id] of syncIds.entries()) {
  keys['app-state-sync-key'][id] = proto.Message.AppStateSyncKeyData.fromObject({
    keyData: randomBytes(32),
    fingerprint: { rawId: randomInt(2 ** 31), currentIndex: i, deviceIndexes: [0, 1, 3] },
    timestamp: 1760000000000 + i
  })
}
for (const name of ['critical_block', 'critical_unblock_low', 'regular', 'regular_high', 'regular_low']) {
  const indexValueMap = {}
  for (let i = 0; i < 3; i++) indexValueMap[b64(32)] = { valueMac: randomBytes(32) }
  keys['app-state-sync-version'][name] = { version: 1 + randomInt(900), hash: randomBytes(128), indexValueMap }
}
for (let i = 0; i < 4; i++) {
  const pn = phone()
  const l = lid()
  keys['lid-mapping'][pn] = l
  keys['lid-mapping'][`${l}_reverse`] = pn
  keys['device-list'][phone()] = ['0', String(1 + i)]
}
const tcJids = [`${lid()}@lid`, `${lid()}@lid`]
keys.tctoken.__index = { token: Buffer.from(JSON.stringify(tcJids)) }
for (const [i, jid] of tcJids.entries()) {
  keys.tctoken[jid] = { token: randomBytes(24), timestamp: String(1760000000 + i), senderTimestamp: 1760000000 + i }
}

await state.keys.set(keys)
await saveCreds()
process.stdout.write(JSON.stringify({ creds: dump(state.creds), keys: dump(keys) }) + '\n')
