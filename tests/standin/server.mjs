// The service stand-in: a small Node service that loads a Baileys auth state the way the real
// WhatsApp service does, with real Baileys, and reports what it loaded.
//
//   file mode      (USE_REPOSITORY_PATTERN=false): useMultiFileAuthState(<SESSIONS_DIR>/<dir>) per company
//   postgres mode  (USE_REPOSITORY_PATTERN=true):  reads whatsapp_auth / whatsapp_keys, revives with BufferJSON
//
// Configuration comes from the environment file named by ENV_FILE (KEY=VALUE lines), read at every start, so
// switching modes is: edit the file, restart. Keys: USE_REPOSITORY_PATTERN, SESSIONS_DIR, COMPANY_DIR (pattern with
// {company_id}), PORT, PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, DB_SCHEMA.
//
// HTTP:
//   GET  /health         {"status":"ok","mode":...,"companies":N,"creds":N,"keys":N,"per_company":{...}}
//   POST /keys?company=ID&count=N   writes N new pre-keys through Baileys (file mode) or SQL (postgres mode)
//
// Writer (WRITER=on): behaves like a live session and journals every acknowledged write, for a Jepsen-style
// check (tests/support/journal_check.py compares the journal with the final store: lost, resurrected, wrong).
//   WRITER_JOURNAL    path of the journal, appended to (required when on); one JSON line per acknowledged op:
//                     {"seq","t","pid","mode","company","op":"set"|"del","type","id","value"}, fsynced before the
//                     next op; creds changes are type "creds", id = the creds field, value = its new value
//   WRITER_RATE       ops per second (default 20); ops are serial, one at a time
//   WRITER_SEED       optional: makes the sequence of operations repeatable
//   WRITER_COMPANIES  optional comma list (default: every loaded company)
// Writes go through Baileys' key store and saveCreds() in file mode, through SQL in postgres mode. A failed write
// is logged and not journaled; the writer tries again at the next tick. SIGTERM/SIGINT: the in-flight op finishes
// (and is journaled when it completed), the journal is closed, exit 0. /health reports "writer": {on, ops, ...}.
import { closeSync, fstatSync, fsyncSync, ftruncateSync, openSync, readFileSync, readdirSync, readSync, statSync,
  writeSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import { createServer } from 'node:http'
import { join } from 'node:path'
import { BufferJSON, Curve, initAuthCreds, useMultiFileAuthState } from '@whiskeysockets/baileys'
import pg from 'pg'

const KEY_TYPES = ['pre-key', 'session', 'sender-key', 'sender-key-memory', 'app-state-sync-key',
  'app-state-sync-version', 'lid-mapping', 'device-list', 'tctoken', 'identity-key']
const LONGEST_FIRST = [...KEY_TYPES].sort((a, b) => b.length - a.length)

function readEnvFile (path) {
  const env = {}
  if (!path) return env
  for (const line of readFileSync(path, 'utf8').split('\n')) {
    const m = line.match(/^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$/)
    if (!m) continue
    let value = m[2]
    if ((value.startsWith('"') && value.endsWith('"')) || (value.startsWith("'") && value.endsWith("'"))) {
      value = value.slice(1, -1)
    }
    env[m[1]] = value
  }
  return env
}

const env = { ...process.env, ...readEnvFile(process.env.ENV_FILE) }
const fileMode = String(env.USE_REPOSITORY_PATTERN ?? 'true').toLowerCase() === 'false'
const port = Number(env.PORT || 3000)
const state = { status: 'starting', mode: fileMode ? 'files' : 'postgres', companies: 0, creds: 0, keys: 0, per_company: {} }
const live = {} // company -> useMultiFileAuthState result (file mode)
const pgCreds = {} // company -> revived creds (postgres mode), what the writer updates

function parseKeyFile (name) {
  if (!name.endsWith('.json') || name === 'creds.json') return null
  const stem = name.slice(0, -5)
  for (const type of LONGEST_FIRST) {
    if (stem.startsWith(type + '-') && stem.length > type.length + 1) {
      let id = stem.slice(type.length + 1)
      if (type === 'sender-key') id = id.replaceAll('--', '::')
      if (type === 'app-state-sync-key') id = id.replaceAll('__', '/')
      return [type, id]
    }
  }
  return null
}

function dirPattern () {
  const tpl = env.COMPANY_DIR || '{company_id}'
  const [prefix, suffix] = tpl.split('{company_id}')
  return (name) => (name.startsWith(prefix) && name.endsWith(suffix) && name.length > prefix.length + suffix.length)
    ? name.slice(prefix.length, name.length - suffix.length) : null
}

function isBytes (v) { return Buffer.isBuffer(v) || v instanceof Uint8Array }

async function loadFiles () {
  const root = env.SESSIONS_DIR
  const companyOf = dirPattern()
  for (const entry of readdirSync(root)) {
    const company = companyOf(entry)
    const dir = join(root, entry)
    if (!company || !statSync(dir).isDirectory()) continue
    const auth = await useMultiFileAuthState(dir)
    live[company] = { auth, dir }
    const hasCreds = readdirSync(dir).includes('creds.json')
    // creds must have revived: real Buffers where Baileys expects them
    if (hasCreds && !isBytes(auth.state.creds.noiseKey?.private)) throw new Error(`${company}: creds did not revive`)
    let keys = 0
    for (const name of readdirSync(dir)) {
      const key = parseKeyFile(name)
      if (!key) continue
      const got = await auth.state.keys.get(key[0], [key[1]])
      if (got[key[1]] === null || got[key[1]] === undefined) throw new Error(`${company}: ${name} did not load`)
      keys++
    }
    state.per_company[company] = { creds: hasCreds ? 1 : 0, keys }
  }
}

function pgClient () {
  return new pg.Client({
    host: env.PGHOST, port: env.PGPORT ? Number(env.PGPORT) : undefined, user: env.PGUSER,
    password: env.PGPASSWORD, database: env.PGDATABASE
  })
}

const schema = () => (env.DB_SCHEMA || 'public').replaceAll('"', '')

async function loadPostgres () {
  const client = pgClient()
  await client.connect()
  try {
    const creds = await client.query(`SELECT company_id, creds::text AS creds FROM "${schema()}".whatsapp_auth`)
    for (const row of creds.rows) {
      const revived = JSON.parse(row.creds, BufferJSON.reviver)
      if (!isBytes(revived.noiseKey?.private)) throw new Error(`${row.company_id}: creds did not revive`)
      pgCreds[row.company_id] = revived
      state.per_company[row.company_id] = { creds: 1, keys: 0 }
    }
    const keys = await client.query(
      `SELECT company_id, count(*)::int AS n FROM "${schema()}".whatsapp_keys GROUP BY company_id`)
    for (const row of keys.rows) {
      state.per_company[row.company_id] ??= { creds: 0, keys: 0 }
      state.per_company[row.company_id].keys = row.n
    }
  } finally {
    await client.end()
  }
}

function summarise () {
  const companies = Object.values(state.per_company)
  state.companies = companies.length
  state.creds = companies.reduce((a, c) => a + c.creds, 0)
  state.keys = companies.reduce((a, c) => a + c.keys, 0)
}

async function addKeys (company, count) {
  const start = 5_000_000 + Math.floor(Math.random() * 1_000_000)
  const fresh = {}
  for (let i = 0; i < count; i++) {
    const pair = initAuthCreds().signedIdentityKey
    fresh[String(start + i)] = { private: pair.private, public: pair.public }
  }
  if (fileMode) {
    const target = live[company]
    if (!target) throw new Error(`unknown company ${company}`)
    await target.auth.state.keys.set({ 'pre-key': fresh })
  } else {
    const client = pgClient()
    await client.connect()
    try {
      for (const [id, value] of Object.entries(fresh)) {
        await client.query(
          `INSERT INTO "${schema()}".whatsapp_keys (company_id, key_type, key_id, value) VALUES ($1, 'pre-key', $2, $3)`,
          [company, id, JSON.stringify(value, BufferJSON.replacer)])
      }
    } finally {
      await client.end()
    }
  }
  state.per_company[company] ??= { creds: 0, keys: 0 }
  state.per_company[company].keys += count
  summarise()
  return Object.keys(fresh)
}

// --------------------------------------------------------------------------- writer (WRITER=on)

const PRE_KEY_BASE = 9_000_000 // writer pre-key ids: far above the ids Baileys hands out
const WRITER_SESSIONS = 64 // session ids writer-0.0 .. writer-63.0
const STOP_GRACE_MS = 1200 // PM2 sends SIGKILL 1.6 s after SIGINT by default
const ON = ['on', 'true', 'yes', '1']

const writer = {
  enabled: ON.includes(String(env.WRITER || '').toLowerCase()),
  rate: Number(env.WRITER_RATE || 20),
  journalPath: env.WRITER_JOURNAL || '',
  fd: null,
  seq: 0,
  stopping: false,
  wake: null,
  loop: null,
  inFlight: null,
  pool: null,
  contexts: [],
  rand: Math.random
}
state.writer = { on: false, ops: 0, errors: 0, last_error: null, by_kind: {}, last_seq: null }

function seededRandom (seed) { // mulberry32 over a string hash
  let a = 0
  for (const ch of String(seed)) a = (Math.imul(a, 31) + ch.codePointAt(0)) | 0
  return () => {
    a = (a + 0x6D2B79F5) | 0
    let t = Math.imul(a ^ (a >>> 15), 1 | a)
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

function pick (items) { return items[Math.floor(writer.rand() * items.length)] }

function writerLog (event, fields) { console.log(JSON.stringify({ event, ...fields })) }

// A failed write is counted and logged, at most once a second while the same error repeats (an outage)
let lastLogged = { error: null, at: 0, suppressed: 0 }
function writerError (err, what) {
  state.writer.errors++
  const error = String(err?.message || err)
  state.writer.last_error = `${what}: ${error}`
  const now = Date.now()
  if (error === lastLogged.error && now - lastLogged.at < 1000) { lastLogged.suppressed++; return }
  console.error(JSON.stringify({ event: 'writer_error', error: state.writer.last_error, errors: state.writer.errors,
    repeated: lastLogged.suppressed || undefined }))
  lastLogged = { error, at: now, suppressed: 0 }
}

function readAt (fd, pos, n) {
  const buf = Buffer.alloc(n)
  readSync(fd, buf, 0, n, pos)
  return buf
}

// Open the journal for appending; a torn last line (a crash in the middle of a write) is cut off, and the next seq
// follows the last complete line, so seq stays unique across restarts of any process writing this journal.
function openJournal (path) {
  const fd = openSync(path, 'a+')
  let size = fstatSync(fd).size
  if (size > 0 && readAt(fd, size - 1, 1)[0] !== 0x0a) { // torn tail: cut back to the last complete line
    let keep = 0
    for (let pos = size; pos > 0;) {
      const n = Math.min(pos, 65536)
      const i = readAt(fd, pos - n, n).lastIndexOf(0x0a)
      if (i >= 0) { keep = pos - n + i + 1; break }
      pos -= n
    }
    ftruncateSync(fd, keep)
    fsyncSync(fd)
    writerLog('writer_journal_torn_tail', { journal: path, dropped_bytes: size - keep })
    size = keep
  }
  if (size === 0) return { fd, seq: 0, preKeyMax: {} }
  // the highest writer pre-key id each company ever had, consumed ones included: a restarted writer never hands
  // one out again (the store alone would not say, once the newest was consumed)
  const preKeyMax = {}
  for (const line of readAt(fd, 0, size).toString('utf8').split('\n')) {
    let e
    try { e = JSON.parse(line) } catch { continue }
    if (e && e.type === 'pre-key' && e.op === 'set' && /^\d+$/.test(String(e.id))) {
      preKeyMax[e.company] = Math.max(preKeyMax[e.company] ?? 0, Number(e.id))
    }
  }
  for (let chunk = 65536; ; chunk *= 4) {
    const n = Math.min(size, chunk)
    const lines = readAt(fd, size - n, n).toString('utf8').split('\n').filter(Boolean)
    if (n < size) lines.shift() // may start in the middle of a line
    for (const line of lines.reverse()) {
      let seq
      try { seq = JSON.parse(line).seq } catch {}
      if (Number.isInteger(seq)) return { fd, seq, preKeyMax }
    }
    if (n === size) {
      closeSync(fd)
      throw new Error(`journal ${path} holds no line with a seq: not a writer journal`)
    }
  }
}

function journal (entry) {
  const line = Buffer.from(JSON.stringify({ seq: writer.seq + 1, t: Date.now(), pid: process.pid, mode: state.mode,
    ...entry }) + '\n')
  let off = 0
  while (off < line.length) off += writeSync(writer.fd, line, off, line.length - off)
  fsyncSync(writer.fd)
  writer.seq++
  state.writer.ops++
  state.writer.last_seq = writer.seq
  const kind = entry.type === 'creds' ? 'creds' : `${entry.op} ${entry.type}`
  state.writer.by_kind[kind] = (state.writer.by_kind[kind] || 0) + 1
}

const toJSON = (value) => JSON.parse(JSON.stringify(value, BufferJSON.replacer))

function sessionValue () {
  const key = () => randomBytes(32)
  return {
    _sessions: {
      [randomBytes(33).toString('base64')]: {
        registrationId: 1 + Math.floor(writer.rand() * 16380),
        currentRatchet: { ephemeralKeyPair: { pubKey: randomBytes(33), privKey: key() }, rootKey: key(),
          previousCounter: Math.floor(writer.rand() * 100) },
        chains: { [randomBytes(33).toString('base64')]: { chainKey: { counter: 0, key: key() } } }
      }
    },
    version: 'v1'
  }
}

async function writerContexts () {
  const wanted = env.WRITER_COMPANIES ? env.WRITER_COMPANIES.split(',').map((s) => s.trim()).filter(Boolean) : null
  const companies = Object.keys(state.per_company).filter((c) => !wanted || wanted.includes(c)).sort()
  for (const c of wanted || []) if (!state.per_company[c]) writerLog('writer_unknown_company', { company: c })
  const contexts = []
  let rows = []
  if (!fileMode && companies.length) {
    const res = await writer.pool.query(
      `SELECT company_id, key_type, key_id FROM "${schema()}".whatsapp_keys
        WHERE company_id = ANY($1) AND key_type IN ('pre-key', 'session')`, [companies])
    rows = res.rows
  }
  for (const company of companies) {
    const ctx = { company, preKeys: new Set(), sessions: new Set(), nextPreKey: PRE_KEY_BASE }
    if (fileMode) {
      if (!live[company]) continue
      for (const name of readdirSync(live[company].dir)) {
        const key = parseKeyFile(name)
        if (key?.[0] === 'pre-key') ctx.preKeys.add(key[1])
        if (key?.[0] === 'session') ctx.sessions.add(key[1])
      }
      ctx.creds = state.per_company[company].creds ? live[company].auth.state.creds : null
    } else {
      for (const row of rows) {
        if (row.company_id !== company) continue
        if (row.key_type === 'pre-key') ctx.preKeys.add(row.key_id)
        else ctx.sessions.add(row.key_id)
      }
      ctx.creds = pgCreds[company] || null
    }
    for (const id of ctx.preKeys) {
      if (/^\d+$/.test(id) && Number(id) >= ctx.nextPreKey) ctx.nextPreKey = Number(id) + 1
    }
    contexts.push(ctx)
  }
  return contexts
}

async function storeSet (ctx, type, id, value) {
  if (fileMode) return live[ctx.company].auth.state.keys.set({ [type]: { [id]: value } })
  await writer.pool.query(
    `INSERT INTO "${schema()}".whatsapp_keys (company_id, key_type, key_id, value) VALUES ($1, $2, $3, $4)
     ON CONFLICT (company_id, key_type, key_id) DO UPDATE SET value = EXCLUDED.value, updated_at = now()`,
    [ctx.company, type, id, JSON.stringify(value, BufferJSON.replacer)])
}

async function storeDelete (ctx, type, id) {
  if (fileMode) return live[ctx.company].auth.state.keys.set({ [type]: { [id]: null } })
  await writer.pool.query(
    `DELETE FROM "${schema()}".whatsapp_keys WHERE company_id = $1 AND key_type = $2 AND key_id = $3`,
    [ctx.company, type, id])
}

async function storeCreds (ctx) {
  if (fileMode) return live[ctx.company].auth.saveCreds()
  const res = await writer.pool.query(
    `UPDATE "${schema()}".whatsapp_auth SET creds = $2, updated_at = now() WHERE company_id = $1`,
    [ctx.company, JSON.stringify(ctx.creds, BufferJSON.replacer)])
  if (res.rowCount !== 1) throw new Error(`no creds row for company ${ctx.company}`)
}

// One operation, journaled only once the store acknowledged it.
async function writerOp (ctx) {
  const base = { company: ctx.company }
  let r = writer.rand()
  if (r >= 0.92 && !ctx.creds) r = 0
  if (r >= 0.60 && r < 0.85 && !ctx.preKeys.size) r = 0.5
  if (r >= 0.85 && r < 0.92 && !ctx.sessions.size) r = 0
  if (r < 0.35) { // a session changes
    const id = `writer-${Math.floor(writer.rand() * WRITER_SESSIONS)}.0`
    const value = sessionValue()
    writer.inFlight = `set session ${id}`
    await storeSet(ctx, 'session', id, value)
    ctx.sessions.add(id)
    journal({ ...base, op: 'set', type: 'session', id, value: toJSON(value) })
  } else if (r < 0.60) { // a pre-key is generated
    const id = String(ctx.nextPreKey++) // used up even if the write fails: never reused
    const value = Curve.generateKeyPair()
    writer.inFlight = `set pre-key ${id}`
    await storeSet(ctx, 'pre-key', id, value)
    ctx.preKeys.add(id)
    journal({ ...base, op: 'set', type: 'pre-key', id, value: toJSON(value) })
  } else if (r < 0.85) { // a pre-key is consumed (one of any age, also those in the store before the writer)
    const id = pick([...ctx.preKeys])
    writer.inFlight = `del pre-key ${id}`
    await storeDelete(ctx, 'pre-key', id)
    ctx.preKeys.delete(id)
    journal({ ...base, op: 'del', type: 'pre-key', id, value: null })
  } else if (r < 0.92) { // a session is closed
    const id = pick([...ctx.sessions])
    writer.inFlight = `del session ${id}`
    await storeDelete(ctx, 'session', id)
    ctx.sessions.delete(id)
    journal({ ...base, op: 'del', type: 'session', id, value: null })
  } else { // creds change
    const field = writer.rand() < 0.5 ? 'accountSyncCounter' : 'lastAccountSyncTimestamp'
    const before = ctx.creds[field]
    const value = field === 'accountSyncCounter'
      ? (Number(before) || 0) + 1
      : Math.max(Math.floor(Date.now() / 1000), (Number(before) || 0) + 1)
    ctx.creds[field] = value
    writer.inFlight = `set creds ${field}`
    try {
      await storeCreds(ctx)
    } catch (err) {
      ctx.creds[field] = before // not written: the next creds write must not carry it unjournaled
      throw err
    }
    journal({ ...base, op: 'set', type: 'creds', id: field, value })
  }
  writer.inFlight = null
}

function writerSleep (ms) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms)
    writer.wake = () => { clearTimeout(timer); resolve() }
  })
}

async function writerLoop () {
  const interval = 1000 / writer.rate
  let next = Date.now()
  for (let i = 0; !writer.stopping; i++) {
    const ctx = writer.contexts[i % writer.contexts.length]
    try {
      await writerOp(ctx)
    } catch (err) {
      writerError(err, writer.inFlight || 'writer')
      writer.inFlight = null
    }
    next += interval
    const now = Date.now()
    if (next < now) next = now
    if (!writer.stopping) await writerSleep(next - now)
  }
}

async function startWriter () {
  if (!writer.enabled) return
  try {
    if (!writer.journalPath) throw new Error('WRITER_JOURNAL is required when WRITER=on')
    if (!(writer.rate > 0)) throw new Error(`WRITER_RATE must be a positive number, got ${env.WRITER_RATE}`)
    if (env.WRITER_SEED) writer.rand = seededRandom(env.WRITER_SEED)
    if (!fileMode) {
      writer.pool = new pg.Pool({
        host: env.PGHOST, port: env.PGPORT ? Number(env.PGPORT) : undefined, user: env.PGUSER,
        password: env.PGPASSWORD, database: env.PGDATABASE, max: 1, connectionTimeoutMillis: 3000,
        query_timeout: 5000, application_name: 'baileys-standin-writer'
      })
      writer.pool.on('error', (err) => writerError(err, 'connection'))
    }
    writer.contexts = await writerContexts()
    if (!writer.contexts.length) throw new Error('no company to write to')
    const opened = openJournal(writer.journalPath)
    writer.fd = opened.fd
    writer.seq = opened.seq
    for (const ctx of writer.contexts) { // never hand out a pre-key id the journal has seen, consumed or not
      const journaled = opened.preKeyMax[ctx.company]
      if (journaled !== undefined && journaled >= ctx.nextPreKey) ctx.nextPreKey = journaled + 1
    }
  } catch (err) {
    writerError(err, 'writer not started')
    return
  }
  state.writer.on = true
  state.writer.rate = writer.rate
  state.writer.companies = writer.contexts.map((c) => c.company)
  writerLog('writer_started', { journal: writer.journalPath, rate: writer.rate, companies: state.writer.companies,
    next_seq: writer.seq + 1 })
  writer.loop = writerLoop()
}

let shuttingDown = false
async function shutdown (signal) {
  if (shuttingDown) return
  shuttingDown = true
  writer.stopping = true
  if (writer.wake) writer.wake()
  const finish = (how) => {
    if (writer.fd !== null) { try { closeSync(writer.fd) } catch {} }
    writer.fd = null
    writerLog('writer_stopped', { signal, how, ops: state.writer.ops, errors: state.writer.errors,
      last_seq: state.writer.last_seq, abandoned: how === 'timeout' ? writer.inFlight : undefined })
    process.exit(0)
  }
  // an op that does not finish in time is abandoned: not journaled (its outcome is unknown)
  setTimeout(() => finish('timeout'), STOP_GRACE_MS).unref()
  try { await writer.loop } catch {}
  finish('clean')
}

if (writer.enabled) {
  process.on('SIGTERM', () => shutdown('SIGTERM'))
  process.on('SIGINT', () => shutdown('SIGINT'))
}

const server = createServer(async (req, res) => {
  const url = new URL(req.url, 'http://localhost')
  const send = (code, body) => {
    res.writeHead(code, { 'content-type': 'application/json' })
    res.end(JSON.stringify(body))
  }
  try {
    if (req.method === 'GET' && url.pathname === '/health') {
      return send(state.status === 'ok' ? 200 : 503, state)
    }
    if (req.method === 'POST' && url.pathname === '/keys') {
      const ids = await addKeys(url.searchParams.get('company'), Number(url.searchParams.get('count') || 1))
      return send(200, { added: ids.length, ids })
    }
    send(404, { error: 'not found' })
  } catch (err) {
    send(500, { error: String(err.message || err) })
  }
})

server.listen(port, '127.0.0.1', async () => {
  const started = Date.now()
  try {
    if (fileMode) await loadFiles()
    else await loadPostgres()
    summarise()
    state.status = 'ok'
    state.load_ms = Date.now() - started
    console.log(JSON.stringify({ event: 'loaded', ...state, per_company: undefined, writer: undefined }))
  } catch (err) {
    state.status = 'error'
    state.error = String(err.message || err)
    console.error(JSON.stringify({ event: 'load_failed', error: state.error }))
  }
  if (state.status === 'ok') await startWriter()
})
