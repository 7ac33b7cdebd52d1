#!/usr/bin/env node
// A local WebTorrent tracker for p2pdiff's tests: the real npm bittorrent-tracker server
// (pinned in package.json), WebSocket only, bound to 127.0.0.1. Started by tests/services.py
// (class Tracker); run by hand as
//   node tracker.mjs --port 18000 [--interval MS] [--log-frames 1]
// Prints "TRACKER_READY ws://127.0.0.1:PORT pid=<pid>" once it listens; runs until signalled.
//
//   --port N          TCP port on 127.0.0.1 (required; 0 = any free port)
//   --interval MS     bittorrent-tracker's `interval` option. WebSocket clients are told
//                     ceil(MS / 1000 / 5) seconds (default MS = 600000, i.e. "interval":120).
//   --log-frames 1    print every frame a client sends as "FRAME <raw JSON>" (tests check the
//                     exact bytes a real client produced; SDPs in there are AES-GCM sealed).
//
// SIGTERM/SIGINT close every client socket with 1001 (going away) and exit: bittorrent-tracker's
// own close() leaves open WebSockets alone (ws 8, clientTracking off), so the process would
// otherwise linger until the test harness kills it. SIGKILL is the "crash" case.
import Server from 'bittorrent-tracker/server'

const argv = process.argv.slice(2)
const opt = (name, dflt) => {
  const i = argv.indexOf('--' + name)
  return i >= 0 && i + 1 < argv.length ? argv[i + 1] : dflt
}
const port = Number(opt('port', 'NaN'))
const interval = opt('interval', undefined)
const logFrames = opt('log-frames', '0') === '1'
const HOST = '127.0.0.1' // loopback only, never configurable

if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`bad --port ${opt('port', '')}`)
  process.exit(2)
}

const server = new Server({
  udp: false,
  http: false,
  ws: true,
  stats: false,
  trustProxy: false,
  ...(interval ? {interval: Number(interval)} : {})
})
const sockets = new Set()
server.on('error', e => {
  // EADDRINUSE lands here; tests/services.py looks for it in this output to pick another port.
  console.error(`tracker error ${e?.code ?? ''} ${e?.message ?? e}`)
  process.exit(1)
})
server.on('warning', e => console.error(`tracker warning ${e?.message ?? e}`))
server.ws.on('connection', socket => {
  sockets.add(socket)
  socket.on('close', () => sockets.delete(socket))
  if (logFrames) socket.on('message', data => console.log(`FRAME ${String(data)}`))
})
server.listen(port, HOST, () => {
  const a = server.ws.address()
  console.log(`TRACKER_READY ws://${a.address}:${a.port} pid=${process.pid}`)
})

let stopping = false
const stop = () => {
  if (stopping) return
  stopping = true
  for (const socket of sockets) socket.close(1001, 'tracker shutting down')
  server.close(() => process.exit(0))
  // Clients that never answer the close handshake must not keep us alive.
  setTimeout(() => process.exit(0), 1000).unref()
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
