#!/usr/bin/env node
// Raw node-datachannel peer for p2pdiff's interop tests (no Trystero, no relay).
// node-datachannel's polyfill is the WebRTC stack Trystero runs on in Node, so this is the
// reference the Python `signaling.peer.Peer` is checked against.
//
//   node ndc_peer.mjs --role offer|answer [--bind 127.0.0.1] [--cand-shape ndc|browser]
//                     [--sdp-cands keep|strip] [--order desc-first|cands-first]
//                     [--echo 1|0] [--timeout 60000] [--log Debug]
//
// Signaling and control are JSON lines. It binds --bind only and uses iceServers [] (no STUN).
//
// stdout (one object per line):
//   {"sig":{"type":"offer"|"answer","sdp":S}}
//   {"sig":{"type":"candidate","candidate":{candidate,sdpMid,sdpMLineIndex,usernameFragment?}}}
//   {"ev":"ready"|"ack"|"open"|"msg"|"expect-done"|"bulk-sent"|"stats"|"dc-close"|"pc-state"|"error"|"exit", ...}
// stdin:
//   {"sig":{...}}                     remote description or candidate (same shapes as above)
//   {"cmd":"send","text":S} | {"cmd":"send","hex":H}
//   {"cmd":"echo","on":bool}          echo every message back with its type (default: --echo)
//   {"cmd":"expect","bytes":N}        count binary bytes from now; at N report expect-done + sha256
//   {"cmd":"bulk","bytes":N,"msg":M}  send N random bytes in M-byte binary messages, honouring
//                                     bufferedAmount (like Trystero's sender), report bulk-sent + sha256
//   {"cmd":"stats"}                   report counters
//   {"cmd":"close"}                   close the channel and the connection, then exit
// stdin EOF closes and exits too, so a dead test runner never leaves this process behind.
//
// Candidate shapes (--cand-shape): "ndc" forwards node-datachannel's own toJSON()
// ("a=candidate:...", sdpMLineIndex null); "browser" rewrites to what browsers send
// ("candidate:...", sdpMid "0", sdpMLineIndex 0, usernameFragment).
// --sdp-cands strip removes a=candidate and a=end-of-candidates from our SDP, so the remote can
// only learn our address from the trickled candidates (and the ICE checks we send).
// --order cands-first waits for gathering and emits every candidate before the description,
// the "candidate arrives before the offer/answer" case of Trystero's relays.
import {createHash, randomBytes} from 'node:crypto'
import readline from 'node:readline'
import {initLogger} from 'node-datachannel'
import {RTCPeerConnection} from 'node-datachannel/polyfill'

const args = process.argv.slice(2)
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`)
  return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt
}
const role = opt('role', 'offer')
const bind = opt('bind', '127.0.0.1')
const candShape = opt('cand-shape', 'ndc')
const sdpCands = opt('sdp-cands', 'keep')
const order = opt('order', 'desc-first')
let echo = opt('echo', '1') === '1'
const timeoutMs = Number(opt('timeout', '60000'))
const logLevel = opt('log', '') // libdatachannel log level (Verbose|Debug|Info|Warning|Error) to stderr
if (logLevel) initLogger(logLevel, (level, msg) => process.stderr.write(`[ndc ${level}] ${msg}\n`))

const t0 = performance.now()
const ms = () => Math.round((performance.now() - t0) * 10) / 10
const emit = o => process.stdout.write(JSON.stringify(o) + '\n')
const ev = (name, extra = {}) => emit({ev: name, t: ms(), ...extra})

const pc = new RTCPeerConnection({iceServers: [], bindAddress: bind})
let dc = null
let exiting = false

// ---------------------------------------------------------------- local description + candidates
const localCands = []
let descSent = false
let gatheringDone = null
const gathered = new Promise(resolve => { gatheringDone = resolve })
pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === 'complete') gatheringDone() }

const ufragOf = sdp => (sdp.match(/^a=ice-ufrag:(\S+)/m) || [])[1]

// `c` is an RTCIceCandidate or a bare "a=candidate:..." line taken from our own SDP.
const shapeCandidate = c => {
  const j = typeof c === 'string'
    ? {candidate: c, sdpMLineIndex: null, sdpMid: '0', usernameFragment: null}
    : c.toJSON()
  if (candShape === 'browser') {
    return {
      candidate: j.candidate.replace(/^a=/, ''),
      sdpMid: j.sdpMid ?? '0',
      sdpMLineIndex: 0,
      usernameFragment: ufragOf(pc.localDescription?.sdp ?? '') ?? null,
    }
  }
  return j
}

const sendCandidate = c => emit({sig: {type: 'candidate', candidate: shapeCandidate(c)}})

pc.onicecandidate = e => {
  if (!e.candidate || !e.candidate.candidate) return
  localCands.push(e.candidate)
  // desc-first: trickle as soon as the description is out (Trystero mqtt/nostr behaviour).
  if (order === 'desc-first' && descSent) sendCandidate(e.candidate)
}

const stripCands = sdp =>
  sdp.split(/\r?\n/).filter(l => !/^a=(candidate:|end-of-candidates)/.test(l)).join('\r\n')

const sendDescription = async () => {
  if (order === 'cands-first') {
    await Promise.race([gathered, new Promise(r => setTimeout(r, 10000))])
    // The icecandidate events may still be queued when gathering reports complete, but the
    // local SDP has every candidate by then.
    const lines = new Set((pc.localDescription.sdp.match(/^a=candidate:.*$/gm) ?? []).map(l => l.trim()))
    for (const c of localCands) lines.add(c.candidate.startsWith('a=') ? c.candidate : `a=${c.candidate}`)
    for (const l of lines) sendCandidate(l)
  }
  const d = pc.localDescription
  const sdp = sdpCands === 'strip' ? stripCands(d.sdp) : d.sdp
  emit({sig: {type: d.type, sdp}})
  descSent = true
  if (order === 'desc-first') for (const c of localCands) sendCandidate(c)
}

// ---------------------------------------------------------------- channel
const rx = {msgs: 0, bytes: 0, text: 0}
const tx = {bulkSent: 0, waits: 0, waitTimeouts: 0}
let expect = null // {bytes, got, hash, start}

const onMessage = data => {
  rx.msgs++
  if (typeof data === 'string') {
    rx.text++
    ev('msg', {kind: 'text', data})
    if (echo) dc.send(data)
    return
  }
  const buf = new Uint8Array(data)
  rx.bytes += buf.length
  if (expect) {
    if (!expect.start) expect.start = performance.now()
    expect.hash.update(buf)
    expect.got += buf.length
    if (expect.got >= expect.bytes) {
      const took = performance.now() - expect.start
      ev('expect-done', {bytes: expect.got, sha256: expect.hash.digest('hex'), ms: Math.round(took)})
      expect = null
    }
    return
  }
  ev('msg', {kind: 'binary', bytes: buf.length, hex: buf.length <= 65536 ? Buffer.from(buf).toString('hex') : null})
  if (echo) dc.send(buf)
}

const setupChannel = ch => {
  dc = ch
  ch.binaryType = 'arraybuffer'
  let opened = false
  const onOpen = () => {
    if (opened) return
    opened = true
    ev('open', {label: ch.label, id: ch.id, ordered: ch.ordered, negotiated: ch.negotiated,
      protocol: ch.protocol, maxRetransmits: ch.maxRetransmits, maxPacketLifeTime: ch.maxPacketLifeTime})
  }
  ch.onopen = onOpen
  if (ch.readyState === 'open') queueMicrotask(onOpen)
  ch.onmessage = e => onMessage(e.data)
  ch.onclose = () => ev('dc-close')
  ch.onerror = e => ev('error', {where: 'dc', msg: String(e?.error?.message ?? e?.message ?? e)})
}

pc.onconnectionstatechange = () => ev('pc-state', {state: pc.connectionState})
pc.ondatachannel = e => {
  if (dc) { ev('error', {where: 'dc', msg: 'extra channel ignored'}); return }
  setupChannel(e.channel)
}

// Trystero's sender: wait for bufferedamountlow while above the threshold (spec §6.2).
const bulk = async (total, msgSize) => {
  const hash = createHash('sha256')
  dc.bufferedAmountLowThreshold = 65535
  const start = performance.now()
  let sent = 0
  while (sent < total) {
    if (dc.readyState !== 'open') { ev('error', {where: 'bulk', msg: 'channel closed'}); return }
    if (dc.bufferedAmount > dc.bufferedAmountLowThreshold) {
      tx.waits++
      await new Promise(resolve => {
        const t = setTimeout(() => { tx.waitTimeouts++; resolve() }, 10000)
        dc.onbufferedamountlow = () => { clearTimeout(t); resolve() }
      })
    }
    const chunk = randomBytes(Math.min(msgSize, total - sent))
    hash.update(chunk)
    dc.send(chunk)
    sent += chunk.length
    tx.bulkSent = sent
  }
  ev('bulk-sent', {bytes: sent, sha256: hash.digest('hex'), ms: Math.round(performance.now() - start)})
}

// ---------------------------------------------------------------- control
const shutdown = (why, code = 0) => {
  if (exiting) return
  exiting = true
  try { dc?.close() } catch {}
  try { pc.close() } catch {}
  ev('exit', {why})
  // Give libdatachannel a moment to flush the SCTP abort/close to the remote.
  setTimeout(() => process.exit(code), 200)
}

const pending = []
const addCandidate = async s => {
  const c = s.candidate
  await pc.addIceCandidate(typeof c === 'string' ? {candidate: c, sdpMid: s.sdpMid ?? '0'} : c)
}

const onSignal = async s => {
  if (s.type === 'candidate') {
    if (!pc.remoteDescription) { pending.push(s); return }
    await addCandidate(s)
    return
  }
  await pc.setRemoteDescription({type: s.type, sdp: s.sdp})
  for (const c of pending.splice(0)) await addCandidate(c)
  if (s.type === 'offer') {
    await pc.setLocalDescription()
    await sendDescription()
  }
}

const onCommand = async c => {
  // Acknowledge first, so the driver knows e.g. "expect" is armed before it starts sending.
  if (c.cmd === 'expect') expect = {bytes: c.bytes, got: 0, hash: createHash('sha256'), start: 0}
  ev('ack', {cmd: c.cmd})
  switch (c.cmd) {
    case 'send':
      if (c.text !== undefined) dc.send(c.text)
      else dc.send(Buffer.from(c.hex, 'hex'))
      break
    case 'echo': echo = Boolean(c.on); break
    case 'expect': break
    case 'bulk': await bulk(c.bytes, c.msg ?? 16384); break
    case 'stats': ev('stats', {...rx, ...tx, state: pc.connectionState, dc: dc?.readyState ?? null, bufferedAmount: dc?.bufferedAmount ?? null}); break
    case 'close': shutdown('close command'); break
    default: ev('error', {where: 'cmd', msg: `unknown command ${c.cmd}`})
  }
}

const rl = readline.createInterface({input: process.stdin})
rl.on('line', async line => {
  let m
  try { m = JSON.parse(line) } catch { ev('error', {where: 'stdin', msg: 'bad JSON'}); return }
  try {
    if (m.sig) await onSignal(m.sig)
    else if (m.cmd) await onCommand(m)
  } catch (e) {
    ev('error', {where: m.sig ? 'signal' : 'cmd', msg: String(e?.message ?? e)})
  }
})
rl.on('close', () => shutdown('stdin closed'))
setTimeout(() => shutdown('timeout', 2), timeoutMs).unref()

if (role === 'offer') {
  setupChannel(pc.createDataChannel('data'))
  await pc.setLocalDescription()
  await sendDescription()
}
ev('ready', {role, candShape, sdpCands, order})
