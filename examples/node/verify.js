// Verify AWS Marketplace entitlement in a Node.js product, with node's own http and crypto.
//   node verify.js <public-key.pem> <product-code> <nonce> [max-age-seconds] < token
//     verify a token you fetched yourself: exit 0 and print the claims, or exit 1 and the reason
//   node verify.js challenge <public-key.pem> <product-code> [sidecar-url] [timeout-seconds]
//     run the whole challenge: exit 0 and print the claims, or exit 1 and print
//     {"reason", "message", "retry_after"} as one JSON line on stderr
//   node verify.js usage [sidecar-url] < records.json
//     report usage (custom or saas mode): exit 0 and print the sidecar's answer, or exit 1 and
//     print {"reason", "message", "retry_after"}. Fractional quantities are decimal STRINGS
//     ("0.1"): a JSON number with a fraction becomes a binary float in JavaScript, so it is
//     refused rather than sent inexactly.
// The sidecar may be hostile: one deadline bounds the whole call (a server dripping one byte at a
// time cannot stretch it), the answer is capped, redirects are not followed, no proxy is used, and
// every failure rejects with EntitlementError (fail closed on any `reason`).
"use strict";
const crypto = require("crypto");
const fs = require("fs");
const http = require("http");

const DEFAULT_URL = "http://127.0.0.1:8787";
const MAX_HEADER_BYTES = 16 * 1024;
const MAX_BODY_BYTES = 256 * 1024;
const RETRY_AFTER_MIN = 1;
const RETRY_AFTER_MAX = 600;

class EntitlementError extends Error {
  constructor(reason, message, retryAfter = null) {
    super(`${reason}: ${message}`);
    this.reason = reason;
    this.detail = message;
    this.retryAfter = retryAfter; // seconds, finite, or null
  }
}

function b64url(part) {
  return Buffer.from(part.replace(/-/g, "+").replace(/_/g, "/"), "base64");
}

function parsePart(part, what) {
  try {
    return JSON.parse(b64url(part).toString("utf8"));
  } catch (err) {
    throw new EntitlementError("token_malformed", `unreadable ${what}`);
  }
}

function publicKey(pem) {
  try {
    return crypto.createPublicKey(pem);
  } catch (err) {
    throw new EntitlementError("bad_key", `the product's built-in key: ${err.message}`);
  }
}

function verify(token, publicKeyPem, productCode, nonce, maxAgeSeconds, keyVersion = 1) {
  const fail = (reason, message) => { throw new EntitlementError(`token_${reason}`, message); };
  const key = publicKey(publicKeyPem);
  if (typeof token !== "string" || token.length > 16384) fail("malformed", "size");
  const parts = token.split(".");
  if (parts.length !== 3 || parts.some((p) => p.length === 0)) fail("malformed", "parts");
  const header = parsePart(parts[0], "header");
  if (header === null || header.alg !== "PS256") { // pin PS256
    fail("bad_algorithm", String(header && header.alg));
  }
  const ok = crypto.verify(
    "sha256",
    Buffer.from(`${parts[0]}.${parts[1]}`, "ascii"),
    { key, padding: crypto.constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 },
    b64url(parts[2]),
  );
  if (!ok) fail("bad_signature", "signature does not verify with the key");
  const claims = parsePart(parts[1], "claims");
  if (claims === null || typeof claims !== "object") fail("malformed", "claims");
  if (claims.productCode !== productCode) fail("product_code_mismatch", "another product");
  if (Number(claims.publicKeyVersion) !== keyVersion) fail("key_version_mismatch", "version");
  if (typeof claims.nonce !== "string" || claims.nonce.length !== nonce.length ||
      !crypto.timingSafeEqual(Buffer.from(claims.nonce), Buffer.from(nonce))) {
    fail("nonce_mismatch", "not the nonce this product sent");
  }
  const now = Date.now() / 1000;
  if (typeof claims.iat !== "number") fail("malformed", "iat");
  if (claims.iat > now + 300) fail("iat_in_future", "issued in the future");
  if (claims.iat < now - maxAgeSeconds) fail("too_old", "issued too long ago");
  return claims;
}

// Seconds from a Retry-After value (delta-seconds or an HTTP date), always finite and clamped.
function parseRetryAfter(value, nowMs = Date.now()) {
  if (typeof value !== "string") return null;
  const text = value.trim();
  let seconds = /^[0-9]{1,12}(\.[0-9]{1,9})?$/.test(text)
    ? Number(text)
    : (Date.parse(text) - nowMs) / 1000;
  if (!Number.isFinite(seconds)) seconds = RETRY_AFTER_MIN;
  return Math.min(Math.max(seconds, RETRY_AFTER_MIN), RETRY_AFTER_MAX);
}

function clean(text) {
  return String(text).slice(0, 300).replace(/[\u0000-\u001f\u007f-\u009f]/g, "?");
}

// One HTTP exchange with the sidecar, finished by `deadline` (Date.now() milliseconds).
// Resolves {status, headers, doc} (doc: parsed JSON, or null when empty or not JSON).
function request(method, url, body, deadline) {
  return new Promise((resolve, reject) => {
    let target;
    try {
      target = new URL(url);
    } catch (err) {
      reject(new EntitlementError("bad_url", `not a URL: ${clean(url)}`));
      return;
    }
    if (target.protocol !== "http:" || target.username || target.password) {
      reject(new EntitlementError("bad_url", `the sidecar URL must be http://host:port`));
      return;
    }
    const payload = body === null ? Buffer.alloc(0) : Buffer.from(JSON.stringify(body));
    let settled = false;
    let req = null;
    const finish = (err, value) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (req !== null) req.destroy();
      if (err) reject(err); else resolve(value);
    };
    let connected = false;
    const timer = setTimeout(() => finish(connected
      ? new EntitlementError("timeout", `the sidecar at ${url} did not answer in time`)
      : new EntitlementError("no_sidecar", `no entitlement sidecar answering at ${url} in time`)),
    Math.max(0, deadline - Date.now()));
    req = http.request({
      host: target.hostname.replace(/^\[|\]$/g, ""),
      port: target.port || 80,
      path: target.pathname + target.search,
      method,
      agent: false, // a fresh connection: no pooled socket, no proxy agent
      maxHeaderSize: MAX_HEADER_BYTES,
      insecureHTTPParser: false,
      headers: {
        Accept: "application/json",
        Connection: "close",
        "Content-Type": "application/json",
        "Content-Length": payload.length,
      },
    });
    req.on("socket", (sock) => sock.on("connect", () => { connected = true; }));
    req.on("error", (err) => {
      finish(connected
        ? new EntitlementError("bad_answer", `the sidecar's answer is not valid HTTP (${err.code || err.message})`)
        : new EntitlementError("no_sidecar", `no entitlement sidecar answering at ${url} (${err.message})`));
    });
    req.on("response", (res) => {
      if (res.headers["transfer-encoding"] !== undefined) {
        finish(new EntitlementError("bad_answer", "chunked or encoded answers are not accepted"));
        return;
      }
      const chunks = [];
      let size = 0;
      res.on("data", (chunk) => {
        size += chunk.length;
        if (size > MAX_BODY_BYTES) {
          finish(new EntitlementError("bad_answer", `answer larger than ${MAX_BODY_BYTES} bytes`));
        } else {
          chunks.push(chunk);
        }
      });
      res.on("error", () => finish(new EntitlementError("bad_answer", "the answer was cut short")));
      res.on("close", () => {
        if (!res.complete) finish(new EntitlementError("bad_answer", "the answer was cut short"));
      });
      res.on("end", () => {
        let doc = null;
        const text = Buffer.concat(chunks);
        try {
          doc = text.length ? JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(text)) : null;
        } catch (err) {
          doc = null; // not UTF-8, not JSON, or nested beyond reason
        }
        finish(null, { status: res.statusCode, headers: res.headers, doc });
      });
    });
    req.end(payload);
  });
}

function refusal(status, headers, doc) {
  const error = doc !== null && typeof doc === "object" && !Array.isArray(doc) ? doc.error : undefined;
  let code = `http_${status}`;
  let message = `the sidecar answered HTTP ${status}`;
  if (error !== null && typeof error === "object" && !Array.isArray(error)) {
    if (typeof error.code === "string" && error.code) code = clean(error.code);
    if (typeof error.message === "string" && error.message) message = clean(error.message);
  } else if (typeof error === "string" && error) {
    message = clean(error);
  }
  let retryAfter = parseRetryAfter(headers["retry-after"]);
  if (retryAfter === null && (status === 429 || status === 503)) retryAfter = RETRY_AFTER_MIN;
  if (status === 429) return new EntitlementError("rate_limited", message, retryAfter);
  if (code === "CustomerNotEntitledException") return new EntitlementError("not_entitled", message);
  return new EntitlementError(`sidecar_${status}`, `${code}: ${message}`, retryAfter);
}

// Run the whole challenge against the sidecar; resolve the verified claims or reject.
async function challenge(publicKeyPem, productCode, options = {}) {
  const { url = DEFAULT_URL, timeoutSeconds = 30, keyVersion = 1, maxAgeSeconds = 300 } = options;
  if (!(Number.isFinite(timeoutSeconds) && timeoutSeconds > 0)) {
    throw new RangeError("timeoutSeconds must be a positive finite number");
  }
  const deadline = Date.now() + timeoutSeconds * 1000;
  publicKey(publicKeyPem); // a broken built-in key fails before any network call
  const nonce = crypto.randomBytes(32).toString("base64url");
  const base = url.replace(/\/+$/, "");
  const { status, headers, doc } = await request(
    "POST", `${base}/v1/entitlement/challenge`, { nonce }, deadline);
  if (status !== 200) throw refusal(status, headers, doc);
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    throw new EntitlementError("bad_answer", "the sidecar's answer is not a JSON object");
  }
  if (typeof doc.token !== "string") {
    throw new EntitlementError("no_token", "the sidecar answered without a token");
  }
  return verify(doc.token, publicKeyPem, productCode, nonce, maxAgeSeconds, keyVersion);
}

class UsageError extends Error {
  constructor(reason, message, status = null, retryAfter = null) {
    super(`${reason}: ${message}`);
    this.reason = reason; // invalid, conflict, too_large, unavailable, or a transport reason
    this.detail = message;
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

// AWS's UsageQuantityAsDecimal pattern (botocore's model), whole match: JavaScript's `$` never
// matches before a trailing newline.
const DECIMAL = /^(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?$/;

function exactQuantity(value, field) {
  if (typeof value === "string") {
    if (!DECIMAL.test(value)) {
      throw new UsageError("invalid", `${field} must be a decimal string such as "2.5" ` +
        `(at most 6 decimal places, 0 to 9999999999.999999), got ${clean(value)}`);
    }
    return value;
  }
  if (typeof value === "bigint") return value.toString();
  if (typeof value === "number" && !Number.isSafeInteger(value)) {
    throw new UsageError("invalid", `${field} is ${value}, not a whole number: pass fractions ` +
      `as decimal strings such as "2.5" (a JavaScript number is a binary float, not exact)`);
  }
  return value; // integers as they are; anything else is the sidecar's to refuse, by field
}

function exactRecord(record, field) {
  if (record === null || typeof record !== "object" || Array.isArray(record)) return record;
  const out = { ...record };
  const where = (name) => (field ? `${field}.${name}` : name);
  if ("quantity" in out) out.quantity = exactQuantity(out.quantity, where("quantity"));
  if (Array.isArray(out.allocations)) {
    out.allocations = out.allocations.map((a, i) => (a !== null && typeof a === "object" &&
      "quantity" in a
      ? { ...a, quantity: exactQuantity(a.quantity, `${where("allocations")}[${i}].quantity`) }
      : a));
  }
  return out;
}

const USAGE_REASONS = { 400: "invalid", 409: "conflict", 413: "too_large", 429: "unavailable",
  503: "unavailable" };

// POST /v1/usage: the sidecar's answer once the usage is durable, or a UsageError. `records`
// is one record or a list; a quantity is an integer Number, a BigInt or a decimal string.
async function reportUsage(records, options = {}) {
  const { url = DEFAULT_URL, timeoutSeconds = 10 } = options;
  if (!(Number.isFinite(timeoutSeconds) && timeoutSeconds > 0)) {
    throw new RangeError("timeoutSeconds must be a positive finite number");
  }
  const body = Array.isArray(records)
    ? records.map((r, i) => exactRecord(r, `records[${i}]`))
    : exactRecord(records, "");
  let answer;
  try {
    answer = await request("POST", `${url.replace(/\/+$/, "")}/v1/usage`, body,
      Date.now() + timeoutSeconds * 1000);
  } catch (err) {
    if (err instanceof EntitlementError) throw new UsageError(err.reason, err.detail);
    throw err;
  }
  const { status, headers, doc } = answer;
  if ((status === 200 || status === 202) && doc !== null && typeof doc === "object") return doc;
  const error = doc && typeof doc.error === "object" && doc.error !== null ? doc.error : {};
  throw new UsageError(USAGE_REASONS[status] || `sidecar_${status}`,
    `${clean(String(error.code || `http_${status}`))}: ` +
    `${clean(String(error.message || "no message"))}`,
    status, parseRetryAfter(headers["retry-after"]));
}

module.exports = {
  verify, challenge, reportUsage, parseRetryAfter, EntitlementError, UsageError,
};

function report(err) {
  if (err instanceof UsageError) {
    console.error(JSON.stringify({ reason: err.reason, message: err.detail, retry_after: err.retryAfter }));
    process.exit(1);
  }
  if (err instanceof EntitlementError) {
    console.error(JSON.stringify({ reason: err.reason, message: err.detail, retry_after: err.retryAfter }));
    process.exit(1);
  }
  console.error(`unexpected failure: ${err && err.stack}`);
  process.exit(3);
}

if (require.main === module) {
  const args = process.argv.slice(2);
  if (args[0] === "usage") {
    let records;
    try {
      records = JSON.parse(fs.readFileSync(0, "utf8"));
    } catch (err) {
      report(new UsageError("invalid", "stdin must hold the records as JSON"));
    }
    reportUsage(records, { url: args[1] || DEFAULT_URL })
      .then((doc) => console.log(JSON.stringify(doc)), report);
  } else if (args[0] === "challenge") {
    const [, keyFile, productCode, url, timeout] = args;
    challenge(fs.readFileSync(keyFile, "utf8"), productCode,
      { url: url || DEFAULT_URL, timeoutSeconds: Number(timeout || 30) })
      .then((claims) => console.log(JSON.stringify(claims)), report);
  } else {
    const [keyFile, productCode, nonce, maxAge] = args;
    const token = fs.readFileSync(0, "utf8").trim();
    try {
      const claims = verify(token, fs.readFileSync(keyFile, "utf8"), productCode, nonce,
        Number(maxAge || 300));
      console.log(JSON.stringify(claims));
    } catch (err) {
      if (!(err instanceof EntitlementError)) report(err);
      console.error(`invalid token: ${err.message}`);
      process.exit(1);
    }
  }
}
