// Turn what Baileys hands out (Buffers, Uint8Arrays, protobuf messages, Longs)
// into plain JSON that a test can compare byte for byte:
//   Buffer / Uint8Array   -> {"$hex": "<lowercase hex>"}
//   protobuf Long         -> {"$long": "<decimal>"}
//   protobuf message      -> {"$class": "<message name>", ...own fields}
// Plain objects and arrays are walked; everything else is left as it is.

const isLong = (v) =>
  v !== null && typeof v === 'object' && typeof v.low === 'number' && typeof v.high === 'number' &&
  typeof v.unsigned === 'boolean' && typeof v.toString === 'function'

export function dump (value) {
  if (value === null || typeof value !== 'object') return value
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) {
    return { $hex: Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString('hex') }
  }
  if (isLong(value)) return { $long: value.toString() }
  if (Array.isArray(value)) return value.map(dump)
  const out = {}
  const proto = Object.getPrototypeOf(value)
  if (proto !== Object.prototype && proto !== null) {
    out.$class = value.constructor?.name ?? 'unknown'
  }
  for (const key of Object.keys(value)) {
    if (value[key] !== undefined) out[key] = dump(value[key])
  }
  return out
}

// Reverse of the file names of useMultiFileAuthState, as documented by the
// collection: longest type prefix wins; sender-key ids turn "--" back into
// "::", app-state-sync-key ids turn "__" back into "/", other ids unchanged.
export const KEY_TYPES = [
  'pre-key', 'session', 'sender-key', 'sender-key-memory', 'app-state-sync-key',
  'app-state-sync-version', 'lid-mapping', 'device-list', 'tctoken', 'identity-key'
]
const LONGEST_FIRST = [...KEY_TYPES].sort((a, b) => b.length - a.length)

export function parseKeyFileName (name) {
  if (!name.endsWith('.json')) return null
  const stem = name.slice(0, -'.json'.length)
  for (const type of LONGEST_FIRST) {
    const prefix = type + '-'
    if (stem.startsWith(prefix) && stem.length > prefix.length) {
      let id = stem.slice(prefix.length)
      if (type === 'sender-key') id = id.replaceAll('--', '::')
      else if (type === 'app-state-sync-key') id = id.replaceAll('__', '/')
      return [type, id]
    }
  }
  return null
}
