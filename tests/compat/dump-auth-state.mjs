// Load a company directory with Baileys' own useMultiFileAuthState and print
// what Baileys sees, as JSON on stdout (see lib/dump.mjs for the encoding):
//   {"files": [...], "creds": {...}, "keys": {"<type>": {"<id>": value}}, "unknown": [...]}
// Every key file present is read back with state.keys.get(type, [id]).
//
// usage: node dump-auth-state.mjs <company directory>
// Run it from tests/compat so that the pinned Baileys package resolves.
import { readdir, stat } from 'node:fs/promises'
import { useMultiFileAuthState } from '@whiskeysockets/baileys'
import { dump, parseKeyFileName } from './lib/dump.mjs'

const dir = process.argv[2]
if (!dir) {
  console.error('usage: node dump-auth-state.mjs <company directory>')
  process.exit(2)
}
// useMultiFileAuthState creates a missing folder and falls back to fresh
// creds: refuse a missing directory so that a wrong path cannot look valid.
if (!(await stat(dir).catch(() => null))?.isDirectory()) {
  console.error(`not a directory: ${dir}`)
  process.exit(2)
}

const files = (await readdir(dir)).sort()
const { state } = await useMultiFileAuthState(dir)
const keys = {}
const unknown = []
for (const name of files) {
  if (name === 'creds.json' || name.startsWith('.')) continue
  const parsed = parseKeyFileName(name)
  if (!parsed) {
    unknown.push(name)
    continue
  }
  const [type, id] = parsed
  const got = await state.keys.get(type, [id])
  keys[type] ??= {}
  // null here means Baileys could not read or parse the file
  keys[type][id] = dump(got[id] ?? null)
}
process.stdout.write(JSON.stringify({ files, creds: dump(state.creds), keys, unknown }) + '\n')
