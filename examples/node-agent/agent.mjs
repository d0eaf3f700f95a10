#!/usr/bin/env node
// A fusebus agent in JavaScript, written from docs/protocol.md alone.
//
// It serves one subtask type (default "motion-js"): the motion energy of the accelerometer
// (standard deviation of the acceleration magnitude over the window), turned into scores
// over the BasicMotions activities with soft bands. It pulls subtasks (single, or batches
// by column) from the type's durable consumer, publishes one result per subtask, acks,
// dead-letters what it cannot read, and answers $SRV.PING / INFO / STATS so the
// coordinator discovers it.
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
function checkArray(wire, dtype, dims) {
  if (!wire || wire.dtype !== dtype || !Array.isArray(wire.shape) || wire.shape.length !== dims) {
    throw new Error(`expected a ${dtype} array of ${dims} dimensions, got ${wire && wire.dtype}`);
  }
  const shape = wire.shape.map(Number);
  const size = dtype === "int64" ? 8 : 4;
  if (wire.data.byteLength !== shape.reduce((a, b) => a * b, 1) * size) {
    throw new Error("array data length does not match shape");
  }
  // The bytes inside a msgpack buffer need not be aligned: read them through a DataView.
  return { shape, view: new DataView(wire.data.buffer, wire.data.byteOffset, wire.data.byteLength) };
}

// Row `row` of a float32 [rows, samples, channels] array (or the whole of a [samples, channels] one).
function readFloat32Matrix(wire, row = null) {
  const { shape, view } = checkArray(wire, "float32", row === null ? 2 : 3);
  const [rows, cols] = row === null ? shape : shape.slice(1);
  const offset = row === null ? 0 : row * rows * cols * 4;
  const out = new Float32Array(rows * cols);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(offset + i * 4, true);
  return { rows, cols, values: out };
}

// The accelerometer input of one subtask, checked: [samples, 3 channels].
function inputOf(wire, row = null) {
  const matrix = readFloat32Matrix(wire, row);
  if (matrix.cols !== 3) throw new Error(`accelerometer must have 3 channels, got ${matrix.cols}`);
  return matrix;
}

function readInt64s(wire, dims) {
  const { view } = checkArray(wire, "int64", dims);
  return Array.from({ length: view.byteLength / 8 }, (_, i) => view.getBigInt64(i * 8, true));
}

// The subtasks of a message: a `subtask`, or a `subtask_batch` whose row i of every column
// is subtask i.
function subtasksOf(message) {
  if (typeof message !== "object" || message === null) throw new Error("not a map");
  if (Number(message.v) > 1) throw new Error(`${message.kind} v=${message.v} is newer than this agent reads`);
  if (message.kind === "subtask") {
    return [{ ...message, input: inputOf(message.inputs?.[sensor]) }];
  }
  if (message.kind !== "subtask_batch") {
    throw new Error(`expected kind "subtask" or "subtask_batch", got ${message.kind}`);
  }
  const windows = readInt64s(message.windows, 2);
  const deadlines = readInt64s(message.deadline_ns, 1);
  const ingests = readInt64s(message.ingest_ns, 1);
  return message.task_ids.map((taskId, i) => ({
    task_id: taskId,
    stream: message.streams[i],
    window: { t_start_ns: windows[2 * i], t_end_ns: windows[2 * i + 1] },
    deadline_ns: deadlines[i],
    expected: message.expected[i],
    ingest_ns: ingests[i],
    ticket: message.tickets?.[i],
    input: inputOf(message.inputs?.[sensor], i),
  }));
}

function float32Vector(values) {
  const bytes = new Uint8Array(values.length * 4);
  const view = new DataView(bytes.buffer);
  values.forEach((v, i) => view.setFloat32(i * 4, v, true));
  return { dtype: "float32", shape: [values.length], data: bytes };
}

// --- the model: a batch function like any fusebus agent's -----------------------------------
function predict(matrix) {
  const { rows, values } = matrix;
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
  let subtasks;
  try {
    subtasks = subtasksOf(decode(msg.data, { useBigInt64: true }));
  } catch (err) {
    await deadLetter(msg, "bad_input", String(err.message ?? err));
    msg.term();
    return;
  }
  const live = subtasks.filter((subtask) => BigInt(subtask.deadline_ns) >= nowNs());
  counts.expired += subtasks.length - live.length;
  try {
    const t0 = performance.now();
    const answers = live.map((subtask) => predict(subtask.input));
    counts.inference_ms_total += performance.now() - t0;
    counts.batches += 1;
    const latency = performance.now() - started;
    await Promise.all(live.map((subtask, i) => js.publish(
      `${prefix}.result.${subtask.stream}`,
      encode({
        v: 1, kind: "result", task_id: subtask.task_id, stream: subtask.stream, type,
        agent_id: agentId, model: { name: "motion-energy-js", version: "1.0.0" },
        output: float32Vector(answers[i]), labels, latency_ms: latency, error: null,
        window: subtask.window, expected: subtask.expected, ingest_ns: subtask.ingest_ns, weight,
        // Copied unchanged: fusion decides only tasks whose results carry the coordinator's seal.
        deadline_ns: subtask.deadline_ns, ticket: subtask.ticket ?? new Uint8Array(0),
      }, { useBigInt64: true }),
    )));
    msg.ack();
    counts.processed += live.length;
  } catch (err) {
    counts.errors += 1;
    console.error(JSON.stringify({ event: "batch.failed", error: String(err.message ?? err) }));
    msg.nak(1000);
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
