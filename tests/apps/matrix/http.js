// Node.js HTTP programs for tests/tests/matrix.rs.
//
// server PORT: an http server on 127.0.0.1:PORT. GET: a 2 MiB deterministic
//   body (header X-Pid: the serving process); POST: the body's SHA-256 (hex)
//   and the serving pid. Prints "READY PORT" once it listens.
// server PORT cluster N: the same served by N workers of the cluster module
//   (the primary accepts and hands each connection to a worker). SIGTERM
//   stops the workers, then the primary.
// client PORT N: N requests over a keep-alive agent of 4 sockets, GETs and
//   POSTs of the 2 MiB body in turn, each checked with SHA-256. Prints
//   "OK N requests BYTES bytes sha256 HEX server pids P,Q...".
// fdreuse PORT FILE: one GET on a socket node closes itself, then opens FILE
//   until the file gets the number the socket had, and reads it there.
//   Prints "OK fdreuse fd N read M bytes" when it reads FILE's contents.
'use strict';
const http = require('http');
const net = require('net');
const fs = require('fs');
const crypto = require('crypto');
const cluster = require('cluster');

const [mode, portArg, extra, countArg] = process.argv.slice(2);
const port = Number(portArg);

function blob() {
  const b = Buffer.alloc(2 << 20);
  let x = 12345;
  for (let i = 0; i < b.length; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}
const sha = (b) => crypto.createHash('sha256').update(b).digest('hex');

function serve() {
  if (extra === 'cluster' && cluster.isPrimary) {
    const n = Number(countArg);
    let listening = 0;
    for (let i = 0; i < n; i++) cluster.fork();
    cluster.on('listening', () => {
      if (++listening === n) console.log('READY', port);
    });
    process.on('SIGTERM', () => {
      for (const id in cluster.workers) cluster.workers[id].process.kill('SIGTERM');
      process.exit(0);
    });
    return;
  }
  const body = blob();
  const server = http.createServer((req, res) => {
    if (req.method === 'POST') {
      const h = crypto.createHash('sha256');
      req.on('data', (d) => h.update(d));
      req.on('end', () => res.end(h.digest('hex') + ' ' + process.pid));
    } else {
      res.setHeader('X-Pid', String(process.pid));
      res.end(body);
    }
  });
  server.listen(port, '127.0.0.1', () => {
    if (!cluster.isWorker) console.log('READY', port);
  });
}

function client() {
  const n = Number(extra);
  const body = blob();
  const want = sha(body);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
  const pids = new Set();
  let started = 0;
  let bytes = 0;
  const one = (post) => new Promise((ok, fail) => {
    const req = http.request(
      { host: '127.0.0.1', port, agent, method: post ? 'POST' : 'GET', path: '/' },
      (res) => {
        const parts = [];
        res.on('data', (d) => parts.push(d));
        res.on('end', () => {
          const got = Buffer.concat(parts);
          if (post) {
            const [h, pid] = got.toString().split(' ');
            if (h !== want) return fail(new Error(`POST: the server hashed ${h}`));
            pids.add(pid);
          } else {
            if (sha(got) !== want) return fail(new Error(`GET: ${got.length} other bytes`));
            pids.add(res.headers['x-pid']);
          }
          bytes += body.length;
          ok();
        });
      });
    req.on('error', fail);
    req.end(post ? body : undefined);
  });
  (async () => {
    const lanes = [];
    for (let l = 0; l < 4; l++) {
      lanes.push((async () => {
        while (started < n) await one(started++ % 2 === 1);
      })());
    }
    await Promise.all(lanes);
    agent.destroy();
    console.log('OK', n, 'requests', bytes, 'bytes sha256', want,
      'server pids', [...pids].sort().join(','));
  })().catch((e) => {
    console.log('ERR', e.message);
    process.exit(1);
  });
}

function fdreuse() {
  const file = extra;
  const want = fs.readFileSync(file);
  const s = net.connect(port, '127.0.0.1', () => {
    s.write('GET / HTTP/1.1\r\nHost: matrix\r\nConnection: close\r\n\r\n');
  });
  const fd = () => s._handle && s._handle.fd;
  let sockFd = -1;
  let got = 0;
  s.on('connect', () => { sockFd = fd(); });
  s.on('data', (d) => { got += d.length; });
  s.on('error', (e) => {
    console.log('ERR socket', e.message);
    process.exit(1);
  });
  s.on('close', () => {
    // libuv closed the socket (a raw close system call); open the file until
    // it lands on the socket's number.
    const opened = [];
    let f = -1;
    for (let i = 0; i < 64 && f !== sockFd; i++) {
      f = fs.openSync(file, 'r');
      opened.push(f);
    }
    if (f !== sockFd) {
      console.log('ERR the file never got fd', sockFd, 'opened', opened.join(','));
      process.exit(1);
    }
    const buf = Buffer.alloc(want.length + 16);
    let n;
    try {
      n = fs.readSync(f, buf, 0, buf.length, null);
    } catch (e) {
      console.log('ERR read of the file on fd', f, 'failed:', e.code);
      process.exit(1);
    }
    if (n !== want.length || !buf.subarray(0, n).equals(want)) {
      console.log('ERR read of the file on fd', f, 'returned', n, 'bytes, not its',
        want.length, 'bytes (the socket that had that number got', got, 'bytes)');
      process.exit(1);
    }
    console.log('OK fdreuse fd', f, 'read', n, 'bytes');
  });
}

if (mode === 'server') serve();
else if (mode === 'client') client();
else if (mode === 'fdreuse') fdreuse();
else {
  console.log('ERR unknown mode', mode);
  process.exit(2);
}
