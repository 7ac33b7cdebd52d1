#!/usr/bin/env node
// A long-lived, scriptable real Trystero peer in Node, for p2pdiff's interop tests.
// JSON command lines on stdin, JSON event lines on stdout, diagnostics on stderr.
// The commands and events are handled by peer_core.mjs (shared with the Chromium peer) and
// documented in jspeer.py, the Python driver that starts this process.
//
// Options:
//   --wire 0.25|0.22      Trystero API/wire: @trystero-p2p/* 0.25.4 (default) or the npm alias
//                         trystero022 (= trystero@0.22.0, old wire protocol)
//   --strategy NAME       default strategy for 'join' without one: mqtt (default) | torrent | nostr |
//                         ws-relay (0.25 only: our ws_relay_strategy.mjs, the package is not on npm)
//   --bind ADDR           node-datachannel bindAddress (default 127.0.0.1: loopback only)
//   --name LABEL          prefix for stderr lines (default node)
// stdin EOF counts as 'quit', so the peer never outlives its driver.
import readline from 'node:readline'
import {RTCPeerConnection as NdcPC} from 'node-datachannel/polyfill'
import WebSocket from 'ws'
import {createController, STRATEGIES, strategyModule} from './peer_core.mjs'

const argv = process.argv.slice(2)
const opt = (name, dflt) => {
  const i = argv.indexOf('--' + name)
  return i >= 0 && i + 1 < argv.length ? argv[i + 1] : dflt
}
const wire = opt('wire', '0.25')
const defaultStrategy = opt('strategy', 'mqtt')
const bind = opt('bind', '127.0.0.1')
const name = opt('name', 'node')

const note = msg => process.stderr.write(`[${name}] ${msg}\n`)
// stdout is a pipe: writes are synchronous on Linux, so nothing is lost at process.exit.
const emit = ev => process.stdout.write(JSON.stringify(ev) + '\n')

if (!['0.25', '0.22'].includes(wire) || !STRATEGIES.includes(defaultStrategy)) {
  note(`bad --wire ${wire} or --strategy ${defaultStrategy}`)
  process.exit(2)
}

// torrent and nostr use the global WebSocket, which Node 20 lacks. ws emits 'error' as an
// EventEmitter event that throws when nobody listens (a browser's does not): log it instead
// and let Trystero's reconnect logic run as in a browser.
class QuietWebSocket extends WebSocket {
  constructor(...a) {
    super(...a)
    this.on('error', e => note(`ws error ${this.url} ${e?.code ?? e?.message}`))
  }
}
globalThis.WebSocket ??= QuietWebSocket

// A test peer must survive Trystero's internal hiccups (0.22 JSON.parses relay messages in
// async handlers without try/catch); report them instead of dying.
process.on('unhandledRejection', e => {
  note(`unhandledRejection ${e?.stack ?? e}`)
  emit({type: 'error', message: `unhandledRejection: ${e?.message ?? e}`, ts: Date.now()})
})
process.on('uncaughtException', e => {
  note(`uncaughtException ${e?.stack ?? e}`)
  emit({type: 'error', message: `uncaughtException: ${e?.message ?? e}`, ts: Date.now()})
})

// Every RTCPeerConnection Trystero makes: no STUN/TURN, sockets on loopback only.
class LoopbackPC extends NdcPC {
  constructor(cfg = {}) {
    super({...cfg, iceServers: [], ...(bind ? {bindAddress: bind} : {})})
  }
}

const loadStrategy = async strategy => {
  const specifier = strategyModule(wire, strategy)
  if (!specifier) throw new Error(`strategy ${strategy} does not exist for Trystero ${wire}`)
  return import(specifier)
}

// selfId is per process and shared by all strategies of one Trystero version.
const {selfId} = await loadStrategy(defaultStrategy)

const controller = createController({
  emit,
  wire,
  selfId,
  loadStrategy,
  rtcPolyfill: LoopbackPC,
  defaultStrategy,
  exit: code => process.exit(code)
})

controller.emit({type: 'ready', selfId, kind: 'node', wire, pid: process.pid, node: process.version})

const rl = readline.createInterface({input: process.stdin, crlfDelay: Infinity})
rl.on('line', line => {
  if (!line.trim()) return
  let cmd
  try {
    cmd = JSON.parse(line)
  } catch {
    controller.emit({type: 'error', message: `not JSON: ${line.slice(0, 200)}`})
    return
  }
  controller.handle(cmd)
})
rl.on('close', () => {
  controller.handle({cmd: 'quit'})
  setTimeout(() => process.exit(0), 5000).unref() // in case leaving hangs
})
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => controller.handle({cmd: 'quit'}))
