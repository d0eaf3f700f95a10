#!/usr/bin/env node
// A fusebus agent in JavaScript, written from docs/protocol.md alone.
//
// It serves one subtask type (default "motion-js"): the motion energy of the accelerometer
// (standard deviation of the acceleration magnitude over the window), turned into scores
// over the BasicMotions activities with soft bands. It pulls subtasks from the type's
// durable consumer, publishes one Result per subtask, acks, dead-letters what it cannot
// read, and answers $SRV.PING / INFO / STATS so the coordinator discovers it.
//
//   node agent.mjs --nats-url nats://127.0.0.1:4222 [--prefix fb] [--type motion-js]

import { randomBytes } from "node:crypto";
import { hostname } from "node:os";
import { connect } from "@nats-io/transport-node";
import { AckPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { decode, encode } from "@msgpack/msgpack";

// --- settings ------------------------------------------------------------------------------
function option(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}
const url = option("nats-url", process.env.FUSEBUS_NATS_URL ?? "nats://127.0.0.1:4222");
const prefix = option("prefix", process.env.FUSEBUS_PREFIX ?? "fb");
const type = option("type", "motion-js");
const sensor = option("sensor", "accel");
const weight = Number(option("weight", "0.5"));
const maxBatch = Number(option("max-batch", "64"));

const stem = prefix.replace(/[^A-Za-z0-9_-]/g, "_").toUpperCase();
const tasksStream = `${stem}_TASKS`;
const consumerName = `agent-${type}`;
const agentId = `${type}-${hostname().replace(/[^A-Za-z0-9]/g, "-").slice(0, 24)}-${process.pid}-${randomBytes(2).toString("hex")}`;

// Bands of motion energy per label (same defaults as the Python motion agent).
const bands = [
  ["standing", 0.0, 1.0],
  ["walking", 1.0, 2.5],
  ["running", 2.5, 6.0],
  ["badminton", 6.0, Infinity],
];
const labels = bands.map((b) => b[0]);
const softness = 0.5;

// --- arrays on the wire: {dtype, shape, data} with little-endian bytes --------------------
function readFloat32Matrix(wire) {
  if (!wire || wire.dtype !== "float32" || !Array.isArray(wire.shape) || wire.shape.length !== 2) {
    throw new Error(`input must be a float32 [samples, channels] array, got ${wire && wire.dtype}`);
  }
  const [rows, cols] = wire.shape.map(Number);
  if (wire.data.byteLength !== rows * cols * 4) throw new Error("array data length does not match shape");
  // Copy: the bytes inside a msgpack buffer need not be 4-byte aligned.
  const view = new DataView(wire.data.buffer, wire.data.byteOffset, wire.data.byteLength);
  const out = new Float32Array(rows * cols);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(i * 4, true);
  return { rows, cols, values: out };
}

function float32Vector(values) {
  const bytes = new Uint8Array(values.length * 4);
  const view = new DataView(bytes.buffer);
  values.forEach((v, i) => view.setFloat32(i * 4, v, true));
  return { dtype: "float32", shape: [values.length], data: bytes };
}

// --- the model: a batch function like any fusebus agent's -----------------------------------
function predict(matrix) {
  const { rows, cols, values } = matrix;
  if (cols !== 3) throw new Error(`accelerometer must have 3 channels, got ${cols}`);
  const magnitude = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    const x = values[r * 3], y = values[r * 3 + 1], z = values[r * 3 + 2];
    magnitude[r] = Math.sqrt(x * x + y * y + z * z);
  }
  const mean = magnitude.reduce((a, b) => a + b, 0) / rows;
  const energy = Math.sqrt(magnitude.reduce((a, m) => a + (m - mean) ** 2, 0) / rows);
  const scores = bands.map(([, low, high]) => Math.exp(-(Math.max(low - energy, 0) + Math.max(energy - high, 0)) / softness));
  const total = scores.reduce((a, b) => a + b, 0);
  return scores.map((s) => s / total);
}

// --- serving --------------------------------------------------------------------------------
const counts = { processed: 0, errors: 0, expired: 0, dead_letters: 0, batches: 0, inference_ms_total: 0 };
const nowNs = () => BigInt(Date.now()) * 1_000_000n;

const nc = await connect({ servers: url.split(","), name: `agent-${type}` });
const js = jetstream(nc);
const jsm = await jetstreamManager(nc);

async function deadLetter(msg, reason, error) {
  counts.dead_letters += 1;
  const letter = {
    v: 1, kind: "dead_letter", component: `agent-${type}`, subject: msg.subject, reason, error,
    data: msg.data, headers: {}, first_seen_ns: nowNs(),
  };
  await js.publish(`${prefix}.dlq.agent-${type}`, encode(letter, { useBigInt64: true }));
}

async function handle(msg) {
  const started = performance.now();
  let subtask;
  try {
    subtask = decode(msg.data, { useBigInt64: true });
    if (typeof subtask !== "object" || subtask === null || subtask.kind !== "subtask") {
      throw new Error(`expected kind "subtask", got ${subtask && subtask.kind}`);
    }
    if (Number(subtask.v) > 1) throw new Error(`subtask v=${subtask.v} is newer than this agent reads`);
    const input = readFloat32Matrix(subtask.inputs?.[sensor]);
    if (BigInt(subtask.deadline_ns) < nowNs()) {
      counts.expired += 1;
      msg.ack();
      return;
    }
    const t0 = performance.now();
    const probabilities = predict(input);
    counts.inference_ms_total += performance.now() - t0;
    counts.batches += 1;
    const result = {
      v: 1, kind: "result", task_id: subtask.task_id, stream: subtask.stream, type,
      agent_id: agentId, model: { name: "motion-energy-js", version: "1.0.0" },
      output: float32Vector(probabilities), labels, latency_ms: performance.now() - started,
      error: null, window: subtask.window, expected: subtask.expected, ingest_ns: subtask.ingest_ns,
      weight,
    };
    await js.publish(`${prefix}.result.${subtask.stream}`, encode(result, { useBigInt64: true }));
    msg.ack();
    counts.processed += 1;
  } catch (err) {
    await deadLetter(msg, subtask ? "bad_input" : "not_msgpack", String(err.message ?? err));
    msg.term();
  }
}

// Discovery: answer the NATS micro protocol so `fusebus status` and auto plans see this agent.
const started = new Date().toISOString();
const info = {
  agent_id: agentId, type, model: { name: "motion-energy-js", version: "1.0.0" }, runtime: "node",
  inputs: [{ sensor, samples: 0, channels: 3 }], labels, weight,
};
const metadata = { "fusebus.role": "agent", "fusebus.prefix": prefix, "fusebus.agent_info": JSON.stringify(info) };
const statusSubject = `${prefix}.ctl.agent-${type}.${agentId}`;
const identity = { name: type, id: agentId, version: "1.0.0", metadata };
const replies = {
  PING: () => ({ type: "io.nats.micro.v1.ping_response", ...identity }),
  INFO: () => ({
    type: "io.nats.micro.v1.info_response", ...identity, description: "fusebus agent in JavaScript",
    endpoints: [{ name: "status", subject: statusSubject, queue_group: "q", metadata: {} }],
  }),
  STATS: () => ({
    type: "io.nats.micro.v1.stats_response", ...identity, started,
    endpoints: [{
      name: "status", subject: statusSubject, queue_group: "q", num_requests: 0, num_errors: 0,
      last_error: "", processing_time: 0, average_processing_time: 0, data: counts,
    }],
  }),
};
for (const [verb, reply] of Object.entries(replies)) {
  for (const subject of [`$SRV.${verb}`, `$SRV.${verb}.${type}`, `$SRV.${verb}.${type}.${agentId}`]) {
    nc.subscribe(subject, { callback: (_err, m) => m.respond(JSON.stringify(reply())) });
  }
}
nc.subscribe(statusSubject, { callback: (_err, m) => m.respond(JSON.stringify(counts)) });

// The type's durable consumer, shared by every replica; the stream is made by fusebus.
for (;;) {
  try {
    await jsm.consumers.add(tasksStream, {
      durable_name: consumerName, name: consumerName, filter_subject: `${prefix}.task.${type}`,
      ack_policy: AckPolicy.Explicit, max_deliver: 5, ack_wait: 10_000_000_000, max_ack_pending: 20000,
      max_waiting: 512,
    });
    break;
  } catch (err) {
    console.error(`waiting for stream ${tasksStream}: ${err.message}`);
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}
const consumer = await js.consumers.get(tasksStream, consumerName);
const messages = await consumer.consume({ max_messages: maxBatch });
console.error(JSON.stringify({ event: "agent.started", agent_id: agentId, type, url, prefix }));

const stop = async () => {
  messages.stop();
  await nc.drain();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

for await (const msg of messages) {
  await handle(msg);
}
