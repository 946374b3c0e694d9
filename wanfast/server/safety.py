"""What the service shows to clients, made safe: no server paths in messages, no text that cannot be
encoded as UTF-8 in a response, the host names it answers to, and the browser security headers.

Pure functions, no FastAPI: the job store and the worker use ``redact_paths`` too.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re

# an absolute POSIX path of two or more components; the last one (a file name) is kept
_PATH = re.compile(r"(?<![\w.~])/(?:[^\s/'\"()\[\]{}<>,;:=]+/)+([^\s/'\"()\[\]{}<>,;:=]*)")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def redact_paths(text: str | None) -> str | None:
    """``text`` with every absolute path cut to its last component: ``'/srv/ckpt/vae.pth'`` becomes
    ``'…/vae.pth'``. Error messages reach clients; the server's directory layout must not."""
    if text is None:
        return None
    return _PATH.sub(lambda m: "…/" + m.group(1), text)


def utf8_safe(value: object) -> object:
    """``value`` (str, or JSON-like lists and dicts of them) with lone UTF-16 surrogates replaced by their
    escape (``\\udfff``): such strings cannot be encoded as UTF-8, so one stored before the door refused
    them would make every response that carries it fail."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [utf8_safe(v) for v in value]
    if isinstance(value, dict):
        return {utf8_safe(k): utf8_safe(v) for k, v in value.items()}
    return value


def lone_surrogate(text: str) -> str | None:
    """The first character of ``text`` that UTF-8 cannot encode (a lone surrogate), as ``\\uXXXX``."""
    for ch in text:
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return f"\\u{ord(ch):04x}"
    return None


def default_allowed_hosts(bind: str) -> list[str] | None:
    """The host names a server bound to ``bind`` answers by default: the loopback names when it is bound
    to loopback (a browser page of any other site that resolves its own name to 127.0.0.1, DNS rebinding,
    is refused); any (None) otherwise, where ``--allowed-hosts`` should name the public ones."""
    try:
        loopback = ipaddress.ip_address(bind).is_loopback
    except ValueError:
        loopback = bind == "localhost"
    return [*LOOPBACK_HOSTS, bind] if loopback else None


def host_name(header: str) -> str:
    """The name of a ``Host`` header without its port, lower case; IPv6 brackets removed."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(header: str, allowed: list[str] | None) -> bool:
    if allowed is None:
        return True
    name = host_name(header)
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def _sha256(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def inline_hashes(html: str, tag: str) -> list[str]:
    """CSP source hashes of every inline ``<tag>...</tag>`` of ``html`` (the page ships one script and one
    style; hashing them allows exactly those and no injected ones)."""
    return [_sha256(m) for m in re.findall(rf"<{tag}[^>]*>(.*?)</{tag}>", html, flags=re.S)]


def security_headers(*pages: str) -> list[tuple[bytes, bytes]]:
    """Headers for every response: no framing (clickjacking), no MIME sniffing, no referrer, and a content
    policy that allows this origin only, plus the inline scripts and styles of the service's own ``pages``
    (HTML as served) and nothing else."""
    scripts = " ".join(h for page in pages for h in inline_hashes(page, "script")) or "'none'"
    styles = " ".join(h for page in pages for h in inline_hashes(page, "style")) or "'none'"
    csp = (
        "default-src 'none'; "
        f"script-src {scripts}; style-src {styles}; "
        "connect-src 'self'; media-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    headers = {
        "content-security-policy": csp,
        "x-frame-options": "DENY",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cross-origin-opener-policy": "same-origin",
    }
    return [(k.encode(), v.encode()) for k, v in headers.items()]
