// The TypeScript client against the real server binary the Rust workspace builds: write,
// read, explain, a policy denial with its reason, erasure, bad input and deadlines.

import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";
import assert from "node:assert/strict";

import { Client, Code, FeatureStoreError, type WriteRowInput } from "../src/index.js";

// This file runs as dist/test/client.test.js under client/typescript.
const repository = resolve(fileURLToPath(new URL(".", import.meta.url)), "..", "..", "..", "..");
const binary = process.env.FEATURESTORE_SERVER_BIN ?? join(repository, "target", "debug", "featurestore-server");

const servers: ChildProcess[] = [];
let client: Client;

/** Starts the server in a new temporary directory with `config` (a config file's text
 * when given, else authentication disabled); resolves to its address once it serves. */
async function startServer(config?: string, directory = mkdtempSync(join(tmpdir(), "featurestore-ts-"))): Promise<string> {
  assert.ok(existsSync(binary), `no server binary at ${binary}: build it with cargo build -p featurestore-server or set FEATURESTORE_SERVER_BIN`);
  const settings = ["--auth-disabled"];
  if (config !== undefined) {
    writeFileSync(join(directory, "featurestore.toml"), config);
    settings.splice(0, 1, "--config", join(directory, "featurestore.toml"));
  }
  const server = spawn(
    binary,
    [
      ...settings,
      "--listen-address", "127.0.0.1:0",
      "--metrics-listen-address", "127.0.0.1:0",
      "--data-dir", join(directory, "db"),
      "--durability", "buffered",
      "--log-format", "json",
    ],
    { cwd: directory, stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, RUST_LOG: "info" } },
  );
  servers.push(server);
  const log: string[] = [];
  const address = await new Promise<string>((found, failed) => {
    const lines = createInterface({ input: server.stderr! });
    const timer = setTimeout(() => failed(new Error(`the server did not start:\n${log.join("\n")}`)), 120_000);
    lines.on("line", (line) => {
      log.push(line);
      try {
        const event = JSON.parse(line);
        if (event.message === "serving") {
          clearTimeout(timer);
          found(event.address);
        }
      } catch {
        // Not a JSON line.
      }
    });
    server.on("exit", (code) => failed(new Error(`the server exited with ${code}:\n${log.join("\n")}`)));
  });
  return address;
}

before(async () => {
  client = new Client(`http://${await startServer()}`, { timeoutMs: 10_000 });
});

after(() => {
  for (const server of servers) server.kill("SIGTERM");
});

let nextUser = 5000;
const newUser = () => (nextUser += 100);

async function usAdult(user: number) {
  const state = await client.setUserState(user, { jurisdiction: "US", ageBand: "ADULT", linkedApps: ["facebook", "instagram"] });
  assert.equal(state.generation, 1n);
}

function chatRow(userId: number, surfaces: string[], features: WriteRowInput["features"], generation = 1): WriteRowInput {
  return {
    userId,
    surfaces,
    source: "ai_chat",
    originApp: "facebook",
    producerId: "typescript-tests@v1",
    features,
    interactionTimeUnixMicros: BigInt(Date.now() - 3_600_000) * 1000n,
    userStateGeneration: generation,
  };
}

test("written values read back and form matrices", async () => {
  const first = newUser();
  await usAdult(first);
  await usAdult(first + 1);
  const written = await client.writeFeatures([
    chatRow(first, ["facebook_feed"], {
      interest_hiking: 0.25,
      topic_embedding: [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
      top_topic: "hiking",
      conversation_topics: { hiking: 0.5, cooking: 0.25 },
    }),
    chatRow(first + 1, ["facebook_feed"], { interest_hiking: 0.75 }),
  ]);
  assert.deepEqual(written.rows[0].map((verdict) => verdict.verdict), ["ALLOW", "ALLOW", "ALLOW", "ALLOW"]);
  assert.deepEqual(written.rows[1][0].outcomes, { facebook_feed: "STORED" });

  const result = await client.getFeatures(
    [[first, "facebook_feed"], [first + 1, "facebook_feed"], [first + 2, "facebook_feed"]],
    ["interest_hiking", "topic_embedding", "top_topic", "conversation_topics"],
  );
  assert.equal(result.rows.length, 3);
  const row = result.rows[0];
  assert.equal(row.status, "OK");
  assert.equal(row.values.interest_hiking, 0.25);
  assert.deepEqual(row.values.topic_embedding, [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]);
  assert.equal(row.values.top_topic, "hiking");
  assert.deepEqual(row.values.conversation_topics, { hiking: 0.5, cooking: 0.25 });
  assert.equal(result.rows[1].statuses.top_topic, "NOT_FOUND");
  assert.equal(result.rows[1].values.top_topic, undefined);
  assert.equal(result.rows[2].statuses.interest_hiking, "DEFAULTED");

  assert.deepEqual(Array.from(result.matrix("interest_hiking") as Float64Array), [0.25, 0.75, 0]);
  const embeddings = result.matrix("topic_embedding") as Float64Array[];
  assert.equal(embeddings.length, 3);
  assert.deepEqual(Array.from(embeddings[0]), [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]);
  assert.ok(Array.from(embeddings[1]).every(Number.isNaN), "no embedding was written for the second user");
  assert.throws(() => result.matrix("top_topic"), TypeError);
});

test("the policy refuses a value and says why", async () => {
  const user = newUser();
  await usAdult(user);
  // A health topic is never stored for ads.
  const rows = [chatRow(user, ["facebook_ads"], { interest_fitness_health: 0.5 })];
  const explained = await client.explainWrite(rows);
  assert.deepEqual(explained.rows[0][0].reasons, ["SENSITIVE_TOPIC_FOR_ADS"]);
  const written = await client.writeFeatures(rows);
  assert.deepEqual(written.rows[0][0], {
    feature: "interest_fitness_health",
    verdict: "DENY",
    reasons: ["SENSITIVE_TOPIC_FOR_ADS"],
    outcomes: { facebook_ads: "REFUSED" },
  });
  const read = await client.getFeatures([[user, "facebook_ads"]], ["interest_fitness_health"]);
  assert.equal(read.rows[0].statuses.interest_fitness_health, "NOT_FOUND");
});

test("a whole request refused by the policy rejects with its reason", async () => {
  const user = newUser();
  await usAdult(user);
  await client.setUserState(user, { jurisdiction: "US", ageBand: "ADULT", adsObjection: true });
  await assert.rejects(client.writeFeatures([chatRow(user, ["facebook_feed"], { interest_hiking: 0.5 })]), (error) => {
    assert.ok(error instanceof FeatureStoreError);
    assert.equal(error.code, Code.FailedPrecondition);
    assert.equal(error.reason, "STALE_GENERATION");
    assert.equal(error.metadata.current_generation, "2");
    assert.ok(error.requestId);
    return true;
  });
});

test("an erased user is gone and cannot be written", async () => {
  const user = newUser();
  await usAdult(user);
  await client.writeFeatures([chatRow(user, ["facebook_feed"], { top_topic: "cooking" })]);
  const receipt = await client.eraseUser(user);
  assert.equal(receipt.userId, BigInt(user));
  assert.ok(receipt.verifiedAtUnixMicros > 0n);
  assert.equal((await client.erasureStatus(receipt.receiptId)).receiptId, receipt.receiptId);
  const read = await client.getFeatures([[user, "facebook_feed"]], ["top_topic"]);
  assert.equal(read.rows[0].statuses.top_topic, "NOT_FOUND");
  await assert.rejects(client.writeFeatures([chatRow(user, ["facebook_feed"], { top_topic: "cooking" }, 0)]), (error) => {
    assert.ok(error instanceof FeatureStoreError);
    assert.equal(error.reason, "USER_ERASED");
    return true;
  });
});

test("bad input is refused naming the field", async () => {
  await assert.rejects(client.writeFeatures([chatRow(0, ["facebook_feed"], { interest_hiking: 0.5 })]), (error) => {
    assert.ok(error instanceof FeatureStoreError);
    assert.equal(error.code, Code.InvalidArgument);
    assert.match(error.message, /user_id/);
    return true;
  });
  await assert.rejects(client.getFeatures([[1, "facebook_feed"]], ["no_such_feature"], { requestId: "ts-bad-7" }), (error) => {
    assert.ok(error instanceof FeatureStoreError);
    assert.equal(error.code, Code.InvalidArgument);
    assert.match(error.message, /no_such_feature/);
    assert.equal(error.requestId, "ts-bad-7");
    return true;
  });
});

test("every call has a deadline", async () => {
  const keys: [number, string][] = Array.from({ length: 1000 }, (_, index) => [index + 1, "facebook_feed"]);
  await assert.rejects(client.getFeatures(keys, [], { timeoutMs: 1 }), (error) => {
    assert.ok(error instanceof FeatureStoreError);
    assert.equal(error.code, Code.DeadlineExceeded);
    return true;
  });
});

/** A certificate authority, a server certificate for 127.0.0.1 and localhost, and a client
 * certificate named `operators.test`, made with the openssl command in `directory`. */
function makeCertificates(directory: string) {
  const openssl = (...args: string[]) => execFileSync("openssl", args, { cwd: directory, stdio: "pipe" });
  const curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
  openssl("req", "-x509", ...curve, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=featurestore test CA", "-days", "2");
  for (const [name, subject, extensions] of [
    ["server", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"],
    ["client", "/CN=operators.test", "extendedKeyUsage=clientAuth\n"],
  ]) {
    writeFileSync(join(directory, `${name}.ext`), extensions);
    openssl("req", ...curve, "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", subject);
    openssl("x509", "-req", "-in", `${name}.csr`, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
      "-out", `${name}.pem`, "-days", "2", "-extfile", `${name}.ext`);
  }
  const read = (name: string) => readFileSync(join(directory, name));
  return { ca: read("ca.pem"), cert: read("client.pem"), key: read("client.key") };
}

test("TLS with a token or a client certificate", async () => {
  const token = "typescript-client-test-token-7c2e";
  const hash = createHash("sha256").update(token).digest("hex");
  const directory = mkdtempSync(join(tmpdir(), "featurestore-ts-secured-"));
  const { ca, cert, key } = makeCertificates(directory);
  // The secured server both client suites start: TLS, a token or a client certificate.
  const config = readFileSync(join(repository, "client", "testdata", "secured-server.toml"), "utf8")
    .replaceAll("TOKEN_SHA256", hash)
    .replaceAll("CERTIFICATES", directory);
  const address = await startServer(config, directory);
  const refusedWith = (code: Code) => (error: unknown) => {
    assert.ok(error instanceof FeatureStoreError);
    assert.equal(error.code, code, String(error));
    return true;
  };

  const withToken = new Client(`https://${address}`, { token, tls: { ca }, timeoutMs: 10_000 });
  const user = newUser();
  await withToken.setUserState(user, { jurisdiction: "US", ageBand: "ADULT" });
  assert.equal((await withToken.getFeatures([[user, "facebook_feed"]])).rows[0].status, "OK");
  const stats = await withToken.stats();
  assert.match(stats.config, /\(masked\)/);
  assert.ok(!stats.config.includes(hash));
  const withCertificate = new Client(`https://${address}`, { tls: { ca, cert, key }, timeoutMs: 10_000 });
  assert.ok((await withCertificate.stats()).policyHash);

  await assert.rejects(
    new Client(`https://${address}`, { tls: { ca }, timeoutMs: 10_000 }).getFeatures([[1, "facebook_feed"]]),
    refusedWith(Code.Unauthenticated),
  );
  await assert.rejects(
    new Client(`https://${address}`, { token: "not-the-token", tls: { ca }, timeoutMs: 10_000 }).stats(),
    refusedWith(Code.Unauthenticated),
  );
  // A plaintext client does not get through. The transport reports the connection the
  // server closes as UNAVAILABLE, CANCELED or ABORTED (ECONNRESET), depending on when it
  // notices; what matters is that the call fails.
  await assert.rejects(
    new Client(`http://${address}`, { token, timeoutMs: 2_000 }).getFeatures([[1, "facebook_feed"]]),
    FeatureStoreError,
  );
});
