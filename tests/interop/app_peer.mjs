// A test peer that behaves like the published P2P WebGPU Diffusion app in a room, for tests that
// stand in for it. Written by us from the app's observable behaviour (docs/protocol.md, "What the
// published app sends"), not from its code:
// - it registers its six actions right after joining (0.22 drops messages for unknown actions);
// - it sends its capabilities to every peer that joins, and to the whole room 1 s after joining;
// - a GPU page works through the `task` messages it gets one at a time: one `progress` per step
//   ({taskId, chunkId, progress, workerId}) up to 1.0, then nothing: no `result`, no `chunk`;
// - a new task is broadcast as `queue` {tasks: [{id, prompt, status, createdBy, createdAt}]} (no
//   options, no negativePrompt, no type), and ~10 ms later the full task is POSTed to
//   <api>/api/queue without a room id.
// Runs unchanged in Node 20 and in Chromium (fetch, setTimeout only). Commands (see jspeer.py):
//   behaveLikeApp {room, capabilities, stepMs?}      -> app-ready {room}
//   submitTask    {room, prompt, negativePrompt?, options?, api?, postDelayMs?, postFirst?}
//                                                    -> submitted {room, taskId, postStatus, postBody}
// Events: app-progress {room, taskId, chunkId, progress} per progress sent; app-done {room, taskId,
// chunkId, steps} after the last one.

export const APP_ACTIONS = ['capabilities', 'queue', 'task', 'progress', 'result', 'chunk']
const DEFAULT_STEPS = 20 // the app's default when a task names no step range

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

// The app's own id scheme: task_<ms>_<9 base-36 characters>.
const newTaskId = () => `task_${Date.now()}_${Math.random().toString(36).slice(2, 11).padEnd(9, '0')}`

/**
 * @param {object} o
 * @param {string} o.selfId
 * @param {(c: object) => object} o.getRoom          the room record of a command ({id, actions, hooks})
 * @param {(r: object, name: string) => Function} o.ensureAction  registers an action, returns its send
 * @param {(c: object, key: string) => any} o.need
 * @param {(c: object, type: string, fields?: object) => void} o.reply
 * @param {(ev: object) => void} o.out              an unsolicited event
 * @param {(url: string) => void} o.assertLoopback
 */
export const appCommands = ({selfId, getRoom, ensureAction, need, reply, out, assertLoopback}) => {
  const behave = (r, capabilities, stepMs) => {
    const send = Object.fromEntries(APP_ACTIONS.map(name => [name, ensureAction(r, name)]))
    r.hooks.peerJoin = peer => { void send.capabilities(capabilities, peer) }
    setTimeout(() => { if (r.hooks.peerJoin) void send.capabilities(capabilities, null) }, 1000)
    if (!capabilities.hasGPU) return
    // One GPU: tasks are worked through in the order they came, one at a time.
    let work = Promise.resolve()
    r.hooks.action = (name, data) => {
      if (name !== 'task' || !data || typeof data !== 'object') return
      work = work.then(async () => {
        const chunk = data.chunk ?? {}
        const steps = Number.isInteger(chunk.endStep) && Number.isInteger(chunk.startStep)
          ? Math.max(1, chunk.endStep - chunk.startStep) : DEFAULT_STEPS
        for (let step = 1; step <= steps; step++) {
          await sleep(stepMs)
          const progress = step / steps
          await send.progress({taskId: data.id, chunkId: chunk.id, progress, workerId: selfId}, null)
          out({type: 'app-progress', room: r.id, taskId: data.id, chunkId: chunk.id, progress})
        }
        out({type: 'app-done', room: r.id, taskId: data.id, chunkId: chunk.id, steps})
      }).catch(e => out({type: 'error', message: `app worker: ${e?.message ?? e}`}))
    }
  }

  const post = async (api, task) => {
    const resp = await fetch(`${api.replace(/\/$/, '')}/api/queue`, {
      method: 'POST',
      headers: {'Content-Type': 'application/json'},
      body: JSON.stringify(task)
    })
    let body = null
    try { body = await resp.json() } catch { /* not JSON: reported as null */ }
    return {postStatus: resp.status, postBody: body}
  }

  return {
    behaveLikeApp(c) {
      const r = getRoom(c)
      behave(r, need(c, 'capabilities'), c.stepMs ?? 50)
      reply(c, 'app-ready', {room: r.id})
    },

    async submitTask(c) {
      const r = getRoom(c)
      const task = {
        id: newTaskId(),
        type: 'generate',
        prompt: need(c, 'prompt'),
        negativePrompt: c.negativePrompt ?? '',
        options: c.options ?? {model: 'prx-1024', steps: DEFAULT_STEPS, width: 512, height: 512},
        createdAt: Date.now(),
        createdBy: selfId,
        status: 'pending'
      }
      const announced = {tasks: [{id: task.id, prompt: task.prompt, status: task.status,
        createdBy: task.createdBy, createdAt: task.createdAt}]}
      const announce = () => ensureAction(r, 'queue')(announced, null)
      let result = {postStatus: null, postBody: null}
      if (c.api) assertLoopback(c.api)
      if (c.postFirst) {
        if (c.api) result = await post(c.api, task)
        await sleep(c.postDelayMs ?? 10)
        await announce()
      } else {
        await announce()
        await sleep(c.postDelayMs ?? 10)
        if (c.api) result = await post(c.api, task)
      }
      reply(c, 'submitted', {room: r.id, taskId: task.id, ...result})
    }
  }
}
