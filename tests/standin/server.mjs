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
import { readFileSync, readdirSync, statSync } from 'node:fs'
import { createServer } from 'node:http'
import { join } from 'node:path'
import { BufferJSON, initAuthCreds, useMultiFileAuthState } from '@whiskeysockets/baileys'
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
    console.log(JSON.stringify({ event: 'loaded', ...state, per_company: undefined }))
  } catch (err) {
    state.status = 'error'
    state.error = String(err.message || err)
    console.error(JSON.stringify({ event: 'load_failed', error: state.error }))
  }
})
