// Page side of browser_peer.mjs: the Trystero test peer running in Chromium.
// browser_peer.mjs bundles this file with esbuild together with the Trystero strategy modules
// of the chosen wire version and calls start(). Commands arrive through window.peerCommand
// (page.evaluate); events leave through window.peerEmit / window.peerExit (exposeFunction).
import mqtt from 'mqtt'
import {createController} from './peer_core.mjs'
import {createRelayGate} from './relay_gate.mjs'

// Every RTCPeerConnection Trystero makes: never STUN/TURN (offline, loopback only).
const NativePC = window.RTCPeerConnection
class LoopbackPC extends NativePC {
  constructor(cfg = {}) {
    super({...cfg, iceServers: []})
  }
}

// Test hook for the `hold` command (relay_gate.mjs); Trystero opens its sockets only at join.
const relayGate = createRelayGate(mqtt, window.WebSocket)
window.WebSocket = relayGate.WebSocket

export const start = (strategies, wire) => {
  const selfId = strategies.mqtt.selfId // one per page, shared by every strategy module
  const controller = createController({
    emit: ev => { void window.peerEmit(ev) },
    wire,
    selfId,
    loadStrategy: async name => {
      if (!strategies[name]) throw new Error(`strategy ${name} does not exist for Trystero ${wire}`)
      return strategies[name]
    },
    rtcPolyfill: LoopbackPC,
    holdRelays: relayGate.hold,
    exit: code => { void window.peerExit(code) }
  })
  window.peerCommand = cmd => { controller.handle(cmd) } // no return value: do not block evaluate
  window.addEventListener('unhandledrejection', e =>
    controller.emit({type: 'error', message: `unhandledrejection: ${e.reason?.message ?? e.reason}`}))
  controller.emit({type: 'ready', selfId, kind: 'browser', wire, userAgent: navigator.userAgent,
    ...(window.PEER_INFO ?? {})})
}
