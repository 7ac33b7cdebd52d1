#!/usr/bin/env node
// The Trystero test peer in real headless Chromium (Debian's /usr/bin/chromium through
// playwright-core). Same stdin/stdout protocol as trystero_peer.mjs: this process forwards
// command lines to the page (browser_page.js + peer_core.mjs) and prints the page's events.
//
// Options:
//   --wire 0.25|0.22    Trystero version bundled into the page (default 0.25)
//   --name LABEL        prefix for stderr lines (default browser)
//   --chromium PATH     browser binary (default /usr/bin/chromium, env CHROMIUM)
//   --media 0|1         1: grant camera+microphone (fake devices). Only then does Chromium
//                       enumerate interfaces and signal 127.0.0.1 host candidates; without it
//                       the page signals no candidate at all and connects only to peers that
//                       do (node-datachannel does; two such browsers never connect). Default 0,
//                       like an ordinary page.
//   --console 0|1       copy the page's console to stderr (default 1)
//   --tmp DIR           where the fresh Chromium profile goes (default os.tmpdir()); jspeer.py
//                       passes a directory it removes itself, in case this process is killed
// Env BROWSER_EXTRA_ARGS: extra Chromium switches, for debugging.
//
// Runs only where every network interface is loopback (exit 2 otherwise): Chromium picks its
// own sockets and would signal, and draw STUN checks to, the machine's other addresses.
import http from 'node:http'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import readline from 'node:readline'
import {fileURLToPath} from 'node:url'
import * as esbuild from 'esbuild'
import {chromium} from 'playwright-core'
import {STRATEGIES, strategyModule} from './peer_core.mjs'

const HERE = path.dirname(fileURLToPath(import.meta.url))
const argv = process.argv.slice(2)
const opt = (name, dflt) => {
  const i = argv.indexOf('--' + name)
  return i >= 0 && i + 1 < argv.length ? argv[i + 1] : dflt
}
const wire = opt('wire', '0.25')
const name = opt('name', 'browser')
const exe = opt('chromium', process.env.CHROMIUM || '/usr/bin/chromium')
const media = opt('media', '0') === '1'
const showConsole = opt('console', '1') === '1'

const note = msg => process.stderr.write(`[${name}] ${msg}\n`)
const out = ev => process.stdout.write(JSON.stringify(ev) + '\n')

const external = Object.entries(os.networkInterfaces())
  .flatMap(([ifname, addrs]) => (addrs || []).filter(a => !a.internal).map(a => `${ifname}:${a.address}`))
if (external.length) {
  note(`refusing to start Chromium: non-loopback interfaces present (${external.join(' ')}); ` +
    "run inside a loopback-only network namespace: unshare -n -- bash -c 'ip link set lo up; ...'")
  process.exit(2)
}

// 1. Bundle the page in memory. The entry is generated so that only the chosen Trystero
//    version's strategy modules end up in it.
if (!['0.25', '0.22'].includes(wire)) {
  note(`bad --wire ${wire}`)
  process.exit(2)
}
const strategies = STRATEGIES.filter(s => strategyModule(wire, s))
const entry = [
  "import {start} from './browser_page.js'",
  ...strategies.map((s, i) => `import * as s${i} from '${strategyModule(wire, s)}'`),
  `start({${strategies.map((s, i) => `${JSON.stringify(s)}: s${i}`).join(', ')}}, ${JSON.stringify(wire)})`
].join('\n')
const bundle = await esbuild.build({
  stdin: {contents: entry, resolveDir: HERE, sourcefile: 'peer-entry.js'},
  bundle: true,
  format: 'iife',
  platform: 'browser',
  target: 'chrome110',
  write: false,
  logLevel: 'warning',
  define: {'process.env.NODE_ENV': '"production"', global: 'globalThis'}
})
const js = bundle.outputFiles[0].text
await esbuild.stop() // its service child process is not needed any more
const html = `<!doctype html><meta charset="utf-8"><title>trystero test peer ${name}</title>
<script src="/bundle.js"></script>\n`

// 2. Serve it from 127.0.0.1: an http://127.0.0.1 page is a secure context, so Trystero
//    gets crypto.subtle.
const server = http.createServer((req, res) => {
  const url = req.url.split('?')[0]
  const body = url === '/' ? html : url === '/bundle.js' ? js : null
  if (body === null) {
    res.writeHead(url === '/favicon.ico' ? 204 : 404)
    res.end()
    return
  }
  const type = url === '/' ? 'text/html' : 'text/javascript'
  res.writeHead(200, {'content-type': `${type}; charset=utf-8`, 'cache-control': 'no-store'})
  res.end(body)
})
await new Promise(resolve => server.listen(0, '127.0.0.1', resolve))
const pageUrl = `http://127.0.0.1:${server.address().port}/`

// 3. Chromium with a fresh profile. Playwright puts its own --disable-features list first and
//    Chromium keeps only the LAST occurrence of a switch, so ours repeats the parts of
//    playwright's list that matter (no background requests, plain http) and adds
//    WebRtcHideLocalIpsWithMdns: with mDNS hiding on, the mDNS responder cannot start in the
//    namespace and no ICE port ever becomes ready.
const disabledFeatures = ['HttpsUpgrades', 'HttpsFirstBalancedModeAutoEnable', 'MediaRouter',
  'OptimizationHints', 'NetworkTimeServiceQuerying', 'AimEnabled', 'PreconnectToSearch',
  'LensOverlay', 'PaintHolding', 'Translate', 'WebRtcHideLocalIpsWithMdns']
const args = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-breakpad', '--disable-domain-reliability', '--no-pings',
  '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost',
  `--disable-features=${disabledFeatures.join(',')}`,
  // without it Chromium's WebRTC drops lo, the only interface here, and opens no ICE port
  '--allow-loopback-in-peer-connection',
  ...(media ? ['--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream'] : []),
  ...(process.env.BROWSER_EXTRA_ARGS ? process.env.BROWSER_EXTRA_ARGS.split(' ').filter(Boolean) : [])
]
const userDataDir = fs.mkdtempSync(path.join(opt('tmp', os.tmpdir()), 'p2pdiff-chromium-'))

let context = null
let exiting = false
const shutdown = async code => {
  if (exiting) return
  exiting = true
  setTimeout(() => process.exit(code), 5000).unref()
  try { await context?.close() } catch {}
  server.close()
  fs.rmSync(userDataDir, {recursive: true, force: true})
  process.exit(code)
}

try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: exe,
    headless: true,
    args,
    timeout: 30000,
    handleSIGTERM: false, // our handlers let the page leave its rooms first
    handleSIGINT: false
  })
} catch (e) {
  note(`chromium launch failed: ${e?.message ?? e}`)
  await shutdown(1)
}
if (media) await context.grantPermissions(['camera', 'microphone'], {origin: pageUrl.replace(/\/$/, '')})
const page = context.pages()[0] ?? await context.newPage()
await page.exposeFunction('peerEmit', ev => out(ev))
await page.exposeFunction('peerExit', code => { void shutdown(code) })
await page.addInitScript(info => { window.PEER_INFO = info }, {browser: context.browser()?.version() ?? null, pid: process.pid})
if (showConsole) {
  page.on('console', m => note(`console.${m.type()}: ${m.text()}`))
  page.on('pageerror', e => note(`pageerror: ${e?.message ?? e}`))
}
page.on('crash', () => {
  out({type: 'error', message: 'page crashed', ts: Date.now()})
  void shutdown(1)
})
note(`chromium ${context.browser()?.version()} flags: ${args.join(' ')}`)

// 4. Forward commands in order, once the page has loaded (it emits 'ready' itself).
let forward = page.goto(pageUrl)
const send = cmd => {
  forward = forward
    .then(() => page.evaluate(c => window.peerCommand(c), cmd))
    .catch(e => out({type: 'error', ...(cmd?.req !== undefined ? {req: cmd.req} : {}), cmd: cmd?.cmd,
      message: `forwarding to page: ${e?.message ?? e}`, ts: Date.now()}))
}
const quit = () => {
  send({cmd: 'quit'})
  setTimeout(() => void shutdown(0), 5000).unref() // in case the page never answers
}
const rl = readline.createInterface({input: process.stdin, crlfDelay: Infinity})
rl.on('line', line => {
  if (!line.trim()) return
  let cmd
  try {
    cmd = JSON.parse(line)
  } catch {
    out({type: 'error', message: `not JSON: ${line.slice(0, 200)}`, ts: Date.now()})
    return
  }
  send(cmd)
})
rl.on('close', quit) // stdin EOF = quit: never outlive the driver
process.on('SIGTERM', quit)
process.on('SIGINT', quit)
