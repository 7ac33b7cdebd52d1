// Test hook of the Chromium peer (browser_page.js): hold what the relays deliver, then hand it
// to Trystero back to back, as if it had all arrived at once (the `hold` command, jspeer.py).
//
// Why: Trystero 0.22 looks for its pending offer to a peer before an `await` and records the new
// one after it, so two announcements from one peer handled within that gap make it offer twice
// (issue 11: the helper's announce and its offer request arriving together). Delivering them in
// one task makes that gap certain instead of rare.
//
// Where: at the last step before Trystero, so nothing in between can spread the messages again.
//   * mqtt.js: its `message` event. Holding the socket instead would not do: mqtt.js parses one
//     packet at a time and yields to a setTimeout between packets.
//   * nostr and torrent: the WebSocket `message` event, which Trystero handles synchronously.
//     mqtt.js's own socket (subprotocol `mqtt`) passes, it is held at its `message` event.

/**
 * @param {{MqttClient: Function}} mqtt   mqtt.js (the copy the Trystero modules are bundled with)
 * @param {typeof WebSocket} NativeWebSocket
 * @returns {{WebSocket: typeof WebSocket, hold: (match: string, count: number) => Promise<{held: number, matched: number}>}}
 *   Install `WebSocket` as the page's global before Trystero opens sockets. `hold` holds every
 *   relay message from now on until `count` of them contain `match`, then delivers all it holds,
 *   in arrival order, in one go; it resolves with how many it held and how many matched.
 */
export const createRelayGate = (mqtt, NativeWebSocket) => {
  let pending = null // {match, count, matched, queue: [deliver], resolve}

  // Whether the message (its text, for matching) is held; `deliver` hands it on later.
  const held = (text, deliver) => {
    if (!pending) return false
    const p = pending
    p.queue.push(deliver)
    if (text.includes(p.match)) p.matched++
    if (p.matched >= p.count) {
      pending = null
      for (const d of p.queue) d()
      p.resolve({held: p.queue.length, matched: p.matched})
    }
    return true
  }

  const emit = mqtt.MqttClient.prototype.emit
  mqtt.MqttClient.prototype.emit = function (type, ...args) {
    // 'message' args: topic, payload (a Buffer), packet
    if (type === 'message' && held(String(args[1]), () => emit.call(this, type, ...args))) return true
    return emit.call(this, type, ...args)
  }

  class GatedWebSocket extends NativeWebSocket {
    constructor(url, protocols) {
      super(url, protocols)
      if ([].concat(protocols ?? []).includes('mqtt')) return
      const replays = new WeakSet()
      // A capturing listener on the socket runs before Trystero's onmessage, so it can stop the
      // event and dispatch a copy later (dispatchEvent runs the listeners synchronously).
      this.addEventListener('message', e => {
        if (replays.has(e)) return
        const deliver = () => {
          const copy = new MessageEvent('message', {data: e.data})
          replays.add(copy)
          this.dispatchEvent(copy)
        }
        if (held(typeof e.data === 'string' ? e.data : '', deliver)) e.stopImmediatePropagation()
      }, {capture: true})
    }
  }

  const hold = (match, count) => {
    if (pending) return Promise.reject(new Error('hold: already holding'))
    return new Promise(resolve => { pending = {match, count, matched: 0, queue: [], resolve} })
  }

  return {WebSocket: GatedWebSocket, hold}
}
