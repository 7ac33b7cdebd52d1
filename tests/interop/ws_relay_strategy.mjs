// Trystero's ws-relay strategy for the test peers (Trystero 0.23+ API, wire 0.25).
// @trystero-p2p/ws-relay is documented by Trystero 0.25.4 but not published on npm, so this is our
// own client of its protocol, built the way Trystero builds its topic strategies: on the published
// @trystero-p2p/core's createTopicStrategy (announces, offers, answers) and makeSocket (the socket
// with its retries). The protocol (docs/nostr-relay.md; signaling/relays/wsrelay.py is our Python
// client of it), JSON text frames:
//   -> {"type":"subscribe","topic":T}  {"type":"unsubscribe","topic":T}  {"type":"publish","topic":T,"payload":P}
//   <- {"topic":T,"payload":P}   to every subscriber of T, the publisher too
// P is Trystero's StrategyMessage: a JSON string (what Trystero publishes) or an object; anything
// else from the relay is ignored, as the package does. A topic is subscribed once per socket, when
// its first listener arrives, and unsubscribed with its last. Like the package, nothing is
// subscribed again after the socket reconnects (makeSocket gets no onReconnect): a peer that lost
// its relay stays deaf there until it joins again, and our relay tests keep that in mind.
import {createTopicStrategy, makeSocket, selfId, toJson} from '@trystero-p2p/core'

export {selfId}

// url -> {client, listeners: Map(topic -> Set(handler))}: one socket per relay URL per process,
// shared by every room, as Trystero shares its relay sockets.
const relays = new Map()

const isStrategyMessage = p => typeof p === 'string' || (typeof p === 'object' && p !== null && !Array.isArray(p))

const onFrame = listeners => text => {
  let frame
  try {
    frame = JSON.parse(text)
  } catch {
    return
  }
  if (typeof frame?.topic !== 'string' || !isStrategyMessage(frame.payload)) return
  for (const handler of listeners.get(frame.topic) ?? []) handler(frame.topic, frame.payload)
}

const relayFor = url => {
  let relay = relays.get(url)
  if (!relay) {
    const listeners = new Map()
    relay = {url, listeners, client: makeSocket(url, onFrame(listeners))}
    relays.set(url, relay)
  }
  return relay
}

const send = (relay, frame) => relay.client.send(toJson(frame))

export const joinRoom = createTopicStrategy({
  init: config => {
    const urls = config.relayConfig?.urls ?? []
    if (!urls.length) throw new Error('ws-relay: relayConfig.urls must name at least one relay')
    return urls.map(url => {
      const relay = relayFor(url)
      return relay.client.ready.then(() => relay)
    })
  },

  subscribeTopic: (relay, topic, onMessage) => {
    const handler = (t, payload) => void onMessage(t, payload)
    let handlers = relay.listeners.get(topic)
    if (!handlers) {
      handlers = new Set()
      relay.listeners.set(topic, handlers)
      send(relay, {type: 'subscribe', topic})
    }
    handlers.add(handler)
    return () => {
      const current = relay.listeners.get(topic)
      if (!current?.delete(handler) || current.size) return
      relay.listeners.delete(topic)
      send(relay, {type: 'unsubscribe', topic})
    }
  },

  publishTopic: (relay, topic, msg) => send(relay, {type: 'publish', topic, payload: msg})
})
