"""An HTTP(S) server for the HTTP target tests, on 127.0.0.1 and a free port.

argv: RECORD_DIR PLAN [CERT KEY]. PLAN is a JSON list of answers given in
turn (the last one repeats): {"status": 200, "headers": {...}, "body": "..."}
or {"hang": true} (never answers) or {"slow_read": true} (reads the request
body a byte a second, then answers 200). Each request is recorded as
RECORD_DIR/N.json (client's port, method, path, headers, time received)
and N.body, the body streamed to disk. Prints "PORT n" once listening.
"""
import json, os, socket, ssl, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

record_dir, plan = sys.argv[1], json.loads(sys.argv[2])
lock = threading.Lock()
count = [0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        with lock:
            n = count[0]
            count[0] += 1
        answer = plan[min(n, len(plan) - 1)]
        meta = {
            "client_port": self.client_address[1],
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "received_at": time.time(),
        }
        with open(os.path.join(record_dir, "%d.json.tmp" % n), "w") as f:
            json.dump(meta, f)
        os.rename(os.path.join(record_dir, "%d.json.tmp" % n),
                  os.path.join(record_dir, "%d.json" % n))
        if answer.get("hang"):
            time.sleep(3600)
            return
        length = int(self.headers.get("Content-Length", "0"))
        with open(os.path.join(record_dir, "%d.body.tmp" % n), "wb") as f:
            left = length
            while left > 0:
                piece = self.rfile.read(1 if answer.get("slow_read") else min(left, 65536))
                if not piece:
                    break
                f.write(piece)
                left -= len(piece)
                if answer.get("slow_read"):
                    time.sleep(1)
        os.rename(os.path.join(record_dir, "%d.body.tmp" % n),
                  os.path.join(record_dir, "%d.body" % n))
        body = answer.get("body", "").encode()
        self.send_response(answer.get("status", 200))
        for k, v in answer.get("headers", {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
if len(sys.argv) > 4:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[3], sys.argv[4])
    server.socket = context.wrap_socket(server.socket, server_side=True)
print("PORT %d" % server.server_address[1], flush=True)
server.serve_forever()
