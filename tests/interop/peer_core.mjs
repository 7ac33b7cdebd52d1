// Command handling shared by the two Trystero test peers: trystero_peer.mjs (Node) and
// browser_page.js (Chromium). One JSON command object in, JSON event objects out; the hosts
// only move lines between stdin/stdout and this module. It must run unchanged in Node 20 and
// in a browser, so it uses web APIs only (crypto.subtle, TextEncoder, btoa/atob).
// The protocol is documented in jspeer.py (the Python driver).
import {appCommands} from './app_peer.mjs'

// Values, base64 binaries and metadata bigger than this are reported as length + sha256 only,
// so one event line stays well below the driver's line limit.
export const INLINE_LIMIT = 64 * 1024
export const STRATEGIES = ['mqtt', 'torrent', 'nostr', 'ws-relay']
// The module of each strategy per wire. ws-relay exists for 0.23+ only and its npm package is not
// published: ws_relay_strategy.mjs is our own, on the published @trystero-p2p/core.
const STRATEGY_MODULES = {
  '0.25': s => (s === 'ws-relay' ? './ws_relay_strategy.mjs' : `@trystero-p2p/${s}`),
  '0.22': s => (s === 'ws-relay' ? null : `trystero022/${s}`)
}
/** The import specifier of `strategy`'s module on `wire` (relative ones: to this directory), or
 * null if that wire has no such strategy. */
export const strategyModule = (wire, strategy) => STRATEGY_MODULES[wire]?.(strategy) ?? null
const LOOPBACK_HOSTS = new Set(['127.0.0.1', 'localhost', '[::1]', '::1'])
const enc = new TextEncoder()
const dec = new TextDecoder()

// ---- deterministic payloads (jspeer.py pattern_bytes / pattern_text are the same) ----
// A 64 KiB xorshift32 block from the seed; 64 KiB block k is that block with every 32-bit
// word XORed with k * 0x9E3779B9. Cheap to build in pure Python (big-int XOR per block) and
// no two 16348-byte Trystero chunks of one payload are alike. Words are little-endian.
const GOLDEN = 0x9e3779b9
const BLOCK_WORDS = 16384
const xorshiftBlock = seed => {
  const block = new Uint32Array(BLOCK_WORDS)
  let x = ((seed ^ GOLDEN) >>> 0) || 1
  for (let i = 0; i < BLOCK_WORDS; i++) {
    x = (x ^ (x << 13)) >>> 0
    x = (x ^ (x >>> 17)) >>> 0
    x = (x ^ (x << 5)) >>> 0
    block[i] = x
  }
  return block
}

export const patternBytes = (size, seed = 1) => {
  const base = xorshiftBlock(seed >>> 0)
  const words = new Uint32Array(Math.ceil(size / 4))
  for (let i = 0; i < words.length; i++) words[i] = base[i & (BLOCK_WORDS - 1)] ^ Math.imul(i >>> 14, GOLDEN)
  return new Uint8Array(words.buffer, 0, size)
}

// Lower-case ASCII text: byte b of patternBytes becomes 'a' + b % 26.
export const patternText = (size, seed = 1) => dec.decode(patternBytes(size, seed).map(b => 97 + (b % 26)))

export const sha256Hex = async bytes => {
  const d = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes))
  return Array.from(d, b => b.toString(16).padStart(2, '0')).join('')
}

const toBase64 = bytes => {
  let s = ''
  for (let i = 0; i < bytes.length; i += 8192) s += String.fromCharCode(...bytes.subarray(i, i + 8192))
  return btoa(s)
}
const fromBase64 = b64 => Uint8Array.from(atob(b64), c => c.charCodeAt(0))

// What a receiver reports about a payload (also used for 'sent', minus the value).
const describe = async (data, withValue = true) => {
  if (data instanceof ArrayBuffer) data = new Uint8Array(data)
  if (ArrayBuffer.isView(data)) {
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
    const d = {kind: 'binary', bytes: bytes.byteLength, sha256: await sha256Hex(bytes)}
    if (withValue && bytes.byteLength <= INLINE_LIMIT) d.b64 = toBase64(bytes)
    return d
  }
  const kind = typeof data === 'string' ? 'text' : 'json'
  const bytes = enc.encode(kind === 'text' ? data : JSON.stringify(data))
  const d = {kind, len: bytes.byteLength, sha256: await sha256Hex(bytes)}
  if (withValue) {
    if (bytes.byteLength <= INLINE_LIMIT) d.value = data
    else d.truncated = true
  }
  return d
}

const describeMeta = async meta => {
  if (meta === undefined) return {}
  const bytes = enc.encode(JSON.stringify(meta))
  return bytes.byteLength <= INLINE_LIMIT ? {meta} : {metaLen: bytes.byteLength, metaSha256: await sha256Hex(bytes)}
}

// ---- the two Trystero APIs (0.25.x objects vs 0.22 tuples), behind one small interface ----
const WIRES = {
  '0.25': {
    join: (mod, config, relayUrls, roomId, onJoinError) =>
      mod.joinRoom({...config, relayConfig: {urls: relayUrls}}, roomId, {onJoinError}),
    onPeerJoin: (room, f) => { room.onPeerJoin = f },
    onPeerLeave: (room, f) => { room.onPeerLeave = f },
    makeAction: (room, name, onMessage) => {
      const a = room.makeAction(name)
      a.onMessage = (data, ctx) => onMessage(data, ctx.peerId, ctx.metadata)
      return (data, target, meta) => a.send(data, {target, ...(meta !== undefined ? {metadata: meta} : {})})
    }
  },
  '0.22': {
    // 0.22 takes relays as config.relayUrls and onJoinError as a plain third argument;
    // metadata is only allowed with binary payloads (it throws otherwise, reported as error).
    join: (mod, config, relayUrls, roomId, onJoinError) =>
      mod.joinRoom({...config, relayUrls}, roomId, onJoinError),
    onPeerJoin: (room, f) => room.onPeerJoin(f),
    onPeerLeave: (room, f) => room.onPeerLeave(f),
    makeAction: (room, name, onMessage) => {
      const [send, onReceive] = room.makeAction(name)
      onReceive((data, peerId, meta) => onMessage(data, peerId, meta))
      return (data, target, meta) => send(data, target, meta)
    }
  }
}

const withTimeout = (promise, ms, what) => {
  let timer
  const t = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms) })
  return Promise.race([promise, t]).finally(() => clearTimeout(timer))
}

const need = (c, key) => {
  if (c[key] === undefined || c[key] === null || c[key] === '') throw new Error(`${c.cmd}: missing field "${key}"`)
  return c[key]
}

const assertLoopback = url => {
  let host
  try { host = new URL(url).hostname } catch { throw new Error(`bad relay URL ${url}`) }
  if (!LOOPBACK_HOSTS.has(host)) throw new Error(`refusing non-loopback relay ${url} (tests stay on 127.0.0.1)`)
}

const buildPayload = c => {
  const kind = c.kind ?? (c.size !== undefined ? 'binary' : typeof c.value === 'string' ? 'text' : 'json')
  const seed = c.seed ?? 1
  if (kind === 'binary') {
    if (c.size !== undefined) return {kind, data: patternBytes(c.size, seed)}
    return {kind, data: fromBase64(need(c, 'value'))} // binary values travel as base64
  }
  if (kind === 'text') {
    if (c.size !== undefined) return {kind, data: patternText(c.size, seed)}
    if (typeof c.value !== 'string') throw new Error('send: text needs a string "value" or "size"')
    return {kind, data: c.value}
  }
  if (kind === 'json') {
    if (c.value === undefined) throw new Error('send: json needs "value"')
    return {kind, data: c.value}
  }
  throw new Error(`send: unknown kind ${kind} (json|text|binary)`)
}

/**
 * @param {object} o
 * @param {(ev: object) => void} o.emit          writes one event (host: stdout line / exposed function)
 * @param {'0.25'|'0.22'} o.wire
 * @param {string} o.selfId                      Trystero's selfId (one per process, all rooms)
 * @param {(strategy: string) => Promise<object>} o.loadStrategy  the strategy module (joinRoom)
 * @param {Function} o.rtcPolyfill               RTCPeerConnection class: loopback only, no ICE servers
 * @param {(code: number) => void} o.exit        ends the host process
 * @param {string} o.defaultStrategy
 * @param {(match: string, count: number) => Promise<object>} [o.holdRelays]  the `hold` command
 *   (relay_gate.mjs); hosts without it answer `hold` with an error
 */
export const createController = ({emit, wire, selfId, loadStrategy, rtcPolyfill, exit, defaultStrategy = 'mqtt',
  holdRelays = null}) => {
  const api = WIRES[wire]
  if (!api) throw new Error(`unknown wire ${wire} (${Object.keys(WIRES).join('|')})`)
  const rooms = new Map() // room id -> {id, room, actions: Map(name -> send fn), t0}

  // Every event goes through one queue: action events need an async sha256, and they must
  // still come out in the order Trystero delivered them (and before a later peer-leave).
  let outQueue = Promise.resolve()
  const out = ev => {
    outQueue = outQueue
      .then(async () => emit({...(await ev), ts: Date.now()}))
      .catch(e => emit({type: 'error', message: `event: ${e?.message ?? e}`, ts: Date.now()}))
    return outQueue
  }
  const reply = (c, type, fields = {}) => out({type, ...(c.req !== undefined ? {req: c.req} : {}), ...fields})
  const fail = (c, e) => reply(c, 'error', {cmd: c.cmd, message: String(e?.message ?? e)})

  const getRoom = c => {
    const r = rooms.get(need(c, 'room'))
    if (!r) throw new Error(`${c.cmd}: not in room ${c.room}`)
    return r
  }

  const ensureAction = (r, name) => {
    let send = r.actions.get(name)
    if (!send) {
      send = api.makeAction(r.room, name, (data, peer, meta) => {
        r.hooks.action?.(name, data, peer, meta)
        return out(Promise.all([describe(data), describeMeta(meta)]).then(([d, m]) =>
          ({type: 'action', room: r.id, name, peer, ...d, ...m})))
      })
      r.actions.set(name, send)
    }
    return send
  }

  // Long operations (send, ping) run in the background so that they do not hold up the
  // commands behind them; their reply comes when they finish.
  const background = (c, f) => { f().then(([type, fields]) => reply(c, type, fields), e => fail(c, e)) }

  const commands = {
    ...appCommands({selfId, getRoom, ensureAction, need, reply, out, assertLoopback}),

    async join(c) {
      const id = need(c, 'room')
      if (rooms.has(id)) throw new Error(`join: already in room ${id}`)
      const strategy = c.strategy ?? defaultStrategy
      if (!STRATEGIES.includes(strategy)) throw new Error(`join: unknown strategy ${strategy}`)
      const relayUrls = need(c, 'relayUrls')
      relayUrls.forEach(assertLoopback)
      const mod = await loadStrategy(strategy)
      const config = {
        appId: need(c, 'appId'),
        rtcPolyfill,
        rtcConfig: {iceServers: []}, // replaces Trystero's public STUN list
        ...(c.password ? {password: c.password} : {}),
        ...(c.trickleIce !== undefined ? {trickleIce: c.trickleIce} : {})
      }
      // hooks: what app_peer.mjs adds to a room (peerJoin, action)
      const r = {id, strategy, actions: new Map(), hooks: {}, t0: Date.now()}
      const onJoinError = e => out({type: 'join-error', room: id, error: e?.error ?? String(e), peer: e?.peerId})
      r.room = api.join(mod, config, relayUrls, id, onJoinError)
      api.onPeerJoin(r.room, peer => {
        out({type: 'peer-join', room: id, peer, ms: Date.now() - r.t0})
        r.hooks.peerJoin?.(peer)
      })
      api.onPeerLeave(r.room, peer => out({type: 'peer-leave', room: id, peer}))
      rooms.set(id, r)
      reply(c, 'joined', {room: id, strategy, selfId})
    },

    async leave(c) {
      const r = getRoom(c)
      rooms.delete(r.id)
      r.hooks = {}
      await withTimeout(r.room.leave(), 5000, 'leave')
      reply(c, 'left', {room: r.id})
    },

    makeAction(c) {
      const r = getRoom(c)
      const name = need(c, 'name')
      ensureAction(r, name)
      reply(c, 'action-made', {room: r.id, name})
    },

    async send(c) {
      const r = getRoom(c)
      const name = need(c, 'action')
      const send = ensureAction(r, name)
      const {data} = buildPayload(c)
      const d = await describe(data, false) // its kind is what goes on the wire
      // Trystero skips unknown targets with only a console warning: report them instead.
      const active = Object.keys(r.room.getPeers())
      const targets = c.target == null ? active : [].concat(c.target)
      const t = Date.now()
      background(c, async () => {
        await send(data, c.target ?? null, c.meta)
        return ['sent', {room: r.id, action: name, ...d,
          to: targets.filter(p => active.includes(p)), missing: targets.filter(p => !active.includes(p)),
          ms: Date.now() - t}]
      })
    },

    ping(c) {
      const r = getRoom(c)
      const peer = need(c, 'peer')
      background(c, async () => {
        const ms = await withTimeout(r.room.ping(peer), c.timeout ?? 10000, 'ping')
        return ['rtt', {room: r.id, peer, ms}]
      })
    },

    peers(c) {
      const r = getRoom(c)
      reply(c, 'peers', {room: r.id, peers: Object.keys(r.room.getPeers())})
    },

    selfId(c) {
      reply(c, 'self', {selfId})
    },

    hold(c) {
      if (!holdRelays) throw new Error('hold: this peer cannot hold relay messages')
      const released = holdRelays(need(c, 'match'), c.count ?? 1)
      reply(c, 'holding', {match: c.match, count: c.count ?? 1})
      released.then(r => out({type: 'released', ...r}), e => fail(c, e))
    },

    async quit(c) {
      const all = [...rooms.values()]
      rooms.clear()
      await Promise.allSettled(all.map(r => withTimeout(r.room.leave(), 3000, 'leave')))
      await reply(c, 'bye')
      exit(0)
    }
  }

  // Commands start strictly in arrival order (join must finish importing the strategy
  // before a makeAction for that room runs); send and ping then continue in the background.
  let inQueue = Promise.resolve()
  const handle = c => {
    inQueue = inQueue.then(async () => {
      if (!c || typeof c !== 'object' || !Object.hasOwn(commands, c.cmd)) throw new Error(`unknown command ${JSON.stringify(c?.cmd)}`)
      await commands[c.cmd](c)
    }).catch(e => fail(c ?? {}, e))
  }

  return {handle, emit: out, rooms}
}
