"""WSGI application for gunicorn (tests/tests/matrix.rs).

GET: the file named by MATRIX_BLOB. POST: the SHA-256 (hex) of the body.
"""
import hashlib
import os

with open(os.environ["MATRIX_BLOB"], "rb") as f:
    BLOB = f.read()


def app(environ, start_response):
    if environ["REQUEST_METHOD"] == "POST":
        n = int(environ.get("CONTENT_LENGTH") or 0)
        out = hashlib.sha256(environ["wsgi.input"].read(n)).hexdigest().encode()
    else:
        out = BLOB
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(len(out))),
            ("X-Worker", str(os.getpid())),
        ],
    )
    return [out]
