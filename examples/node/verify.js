// Verify an AWS Marketplace RegisterUsage token in a Node.js product, with node's own crypto.
// Usage: node verify.js <public-key.pem> <product-code> <nonce> [max-age-seconds] < token
// Exit 0 and print the claims when valid; exit 1 and print the reason otherwise.
"use strict";
const crypto = require("crypto");
const fs = require("fs");

function b64url(part) {
  return Buffer.from(part.replace(/-/g, "+").replace(/_/g, "/"), "base64");
}

function verify(token, publicKeyPem, productCode, nonce, maxAgeSeconds, keyVersion = 1) {
  if (typeof token !== "string" || token.length > 16384) throw new Error("malformed: size");
  const parts = token.split(".");
  if (parts.length !== 3 || parts.some((p) => p.length === 0)) throw new Error("malformed: parts");
  const header = JSON.parse(b64url(parts[0]).toString("utf8"));
  if (header.alg !== "PS256") throw new Error(`bad_algorithm: ${header.alg}`); // pin PS256
  const ok = crypto.verify(
    "sha256",
    Buffer.from(`${parts[0]}.${parts[1]}`, "ascii"),
    { key: publicKeyPem, padding: crypto.constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 },
    b64url(parts[2]),
  );
  if (!ok) throw new Error("bad_signature");
  const claims = JSON.parse(b64url(parts[1]).toString("utf8"));
  if (claims.productCode !== productCode) throw new Error("product_code_mismatch");
  if (Number(claims.publicKeyVersion) !== keyVersion) throw new Error("key_version_mismatch");
  if (typeof claims.nonce !== "string" || claims.nonce.length !== nonce.length ||
      !crypto.timingSafeEqual(Buffer.from(claims.nonce), Buffer.from(nonce))) {
    throw new Error("nonce_mismatch");
  }
  const now = Date.now() / 1000;
  if (typeof claims.iat !== "number") throw new Error("malformed: iat");
  if (claims.iat > now + 300) throw new Error("iat_in_future");
  if (claims.iat < now - maxAgeSeconds) throw new Error("too_old");
  return claims;
}

module.exports = { verify };

if (require.main === module) {
  const [keyFile, productCode, nonce, maxAge] = process.argv.slice(2);
  const token = fs.readFileSync(0, "utf8").trim();
  try {
    const claims = verify(token, fs.readFileSync(keyFile, "utf8"), productCode, nonce,
      Number(maxAge || 300));
    console.log(JSON.stringify(claims));
  } catch (err) {
    console.error(`invalid token: ${err.message}`);
    process.exit(1);
  }
}
