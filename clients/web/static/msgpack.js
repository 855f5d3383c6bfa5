// A small msgpack encoder/decoder for the masa-rt wire protocol (docs/protocol.md), written
// for this gateway: nil, booleans, integers, float64, UTF-8 strings, binary (Uint8Array),
// arrays and maps (plain objects). Extension types are not used by the protocol and are
// refused. Integers beyond 2^53 decode as BigInt (seq may reach 2^63 - 1).

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });

export function encode(value) {
  const out = new Writer();
  writeValue(out, value);
  return out.bytes();
}

class Writer {
  constructor() { this.buf = new Uint8Array(256); this.view = new DataView(this.buf.buffer); this.n = 0; }
  reserve(k) {
    if (this.n + k <= this.buf.length) return;
    const bigger = new Uint8Array(Math.max(this.buf.length * 2, this.n + k));
    bigger.set(this.buf.subarray(0, this.n));
    this.buf = bigger; this.view = new DataView(bigger.buffer);
  }
  u8(x) { this.reserve(1); this.view.setUint8(this.n, x); this.n += 1; }
  u16(x) { this.reserve(2); this.view.setUint16(this.n, x); this.n += 2; }
  u32(x) { this.reserve(4); this.view.setUint32(this.n, x); this.n += 4; }
  u64(x) { this.reserve(8); this.view.setBigUint64(this.n, BigInt(x)); this.n += 8; }
  i64(x) { this.reserve(8); this.view.setBigInt64(this.n, BigInt(x)); this.n += 8; }
  f64(x) { this.reserve(9); this.view.setUint8(this.n, 0xcb); this.view.setFloat64(this.n + 1, x); this.n += 9; }
  raw(bytes) { this.reserve(bytes.length); this.buf.set(bytes, this.n); this.n += bytes.length; }
  bytes() { return this.buf.slice(0, this.n); }
}

function writeHeader(out, length, fix, fixMax, c8, c16, c32) {
  if (fix !== null && length <= fixMax) out.u8(fix | length);
  else if (c8 !== null && length < 0x100) { out.u8(c8); out.u8(length); }
  else if (length < 0x10000) { out.u8(c16); out.u16(length); }
  else { out.u8(c32); out.u32(length); }
}

function writeInt(out, x) {
  if (x >= 0) {
    if (x < 0x80) out.u8(x);
    else if (x < 0x100) { out.u8(0xcc); out.u8(x); }
    else if (x < 0x10000) { out.u8(0xcd); out.u16(x); }
    else if (x < 0x100000000) { out.u8(0xce); out.u32(x); }
    else { out.u8(0xcf); out.u64(x); }
  } else if (x >= -32) out.u8(0x100 + x);
  else if (x >= -0x80000000) { out.u8(0xd2); out.reserve(4); out.view.setInt32(out.n, x); out.n += 4; }
  else { out.u8(0xd3); out.i64(x); }
}

function writeValue(out, v) {
  if (v === null || v === undefined) out.u8(0xc0);
  else if (v === false) out.u8(0xc2);
  else if (v === true) out.u8(0xc3);
  else if (typeof v === "bigint") { if (v >= 0n) { out.u8(0xcf); out.u64(v); } else { out.u8(0xd3); out.i64(v); } }
  else if (typeof v === "number") {
    if (Number.isSafeInteger(v)) writeInt(out, v); else out.f64(v);
  } else if (typeof v === "string") {
    const b = utf8Encoder.encode(v);
    writeHeader(out, b.length, 0xa0, 31, 0xd9, 0xda, 0xdb); out.raw(b);
  } else if (v instanceof Uint8Array) {
    writeHeader(out, v.length, null, -1, 0xc4, 0xc5, 0xc6); out.raw(v);
  } else if (ArrayBuffer.isView(v)) {
    writeValue(out, new Uint8Array(v.buffer, v.byteOffset, v.byteLength));
  } else if (Array.isArray(v)) {
    writeHeader(out, v.length, 0x90, 15, null, 0xdc, 0xdd);
    for (const item of v) writeValue(out, item);
  } else if (typeof v === "object") {
    const keys = Object.keys(v).filter((k) => v[k] !== undefined);
    writeHeader(out, keys.length, 0x80, 15, null, 0xde, 0xdf);
    for (const k of keys) { writeValue(out, k); writeValue(out, v[k]); }
  } else throw new TypeError(`msgpack: cannot encode ${typeof v}`);
}

export function decode(bytes) {
  const data = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const r = { data, view: new DataView(data.buffer, data.byteOffset, data.byteLength), pos: 0 };
  const value = readValue(r);
  if (r.pos !== data.length) throw new Error("msgpack: extra bytes after the value");
  return value;
}

function take(r, k) {
  if (r.pos + k > r.data.length) throw new Error("msgpack: truncated");
  const at = r.pos; r.pos += k; return at;
}

function readUint64(r) {
  const big = r.view.getBigUint64(take(r, 8));
  return big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
}

function readInt64(r) {
  const big = r.view.getBigInt64(take(r, 8));
  return big >= BigInt(Number.MIN_SAFE_INTEGER) && big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
}

const readStr = (r, n) => utf8Decoder.decode(r.data.subarray(take(r, n), r.pos));
const readBin = (r, n) => r.data.slice(take(r, n), r.pos);

function readArray(r, n) { const a = new Array(n); for (let i = 0; i < n; i++) a[i] = readValue(r); return a; }

function readMap(r, n) {
  const m = {};
  for (let i = 0; i < n; i++) { const k = readValue(r); m[String(k)] = readValue(r); }
  return m;
}

function readValue(r) {
  const b = r.view.getUint8(take(r, 1));
  if (b < 0x80) return b;
  if (b >= 0xe0) return b - 0x100;
  if ((b & 0xf0) === 0x80) return readMap(r, b & 0x0f);
  if ((b & 0xf0) === 0x90) return readArray(r, b & 0x0f);
  if ((b & 0xe0) === 0xa0) return readStr(r, b & 0x1f);
  const v = r.view;
  switch (b) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: return readBin(r, v.getUint8(take(r, 1)));
    case 0xc5: return readBin(r, v.getUint16(take(r, 2)));
    case 0xc6: return readBin(r, v.getUint32(take(r, 4)));
    case 0xca: return v.getFloat32(take(r, 4));
    case 0xcb: return v.getFloat64(take(r, 8));
    case 0xcc: return v.getUint8(take(r, 1));
    case 0xcd: return v.getUint16(take(r, 2));
    case 0xce: return v.getUint32(take(r, 4));
    case 0xcf: return readUint64(r);
    case 0xd0: return v.getInt8(take(r, 1));
    case 0xd1: return v.getInt16(take(r, 2));
    case 0xd2: return v.getInt32(take(r, 4));
    case 0xd3: return readInt64(r);
    case 0xd9: return readStr(r, v.getUint8(take(r, 1)));
    case 0xda: return readStr(r, v.getUint16(take(r, 2)));
    case 0xdb: return readStr(r, v.getUint32(take(r, 4)));
    case 0xdc: return readArray(r, v.getUint16(take(r, 2)));
    case 0xdd: return readArray(r, v.getUint32(take(r, 4)));
    case 0xde: return readMap(r, v.getUint16(take(r, 2)));
    case 0xdf: return readMap(r, v.getUint32(take(r, 4)));
    default: throw new Error(`msgpack: unsupported type byte 0x${b.toString(16)}`);
  }
}
