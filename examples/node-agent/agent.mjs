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
//
// It can also be a stage of a model chain (docs/protocol.md, "Model chains"):
//
//   --reads stats --shape 13   read the answer of type `stats` (per-row shape [13]) instead
//                              of the accelerometer; with a 1-D shape the motion energy is
//                              its last entry (as a window-statistics stage gives it), with
//                              a 2-D one ([any, 3]: --shape 0,3) it is computed as above
//   --output features          answer the window's statistics instead of scores: mean, std,
//                              min and max of each of the 3 channels, then the motion energy
//                              (13 features, float32), for other types to read

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
// The one input: a sensor's [samples, 3 channels], or another type's answer (a stage input).
const reads = option("reads", null);
const input = reads ?? sensor;
const inputShape = reads === null ? [0, 3] : option("shape", "").split(",").filter(Boolean).map(Number);
const output = option("output", "scores");
function usage(problem) {
  console.error(`agent.mjs: ${problem}`);
  process.exit(2);
}
if (!(inputShape.length === 1 || (inputShape.length === 2 && inputShape[1] === 3))
    || !inputShape.every((n) => Number.isInteger(n) && n >= 0)) {
  usage(`--shape must be one size (features) or <samples>,3 (0 = any), got ${option("shape", "nothing")}`);
}
if (output !== "scores" && output !== "features") usage(`--output must be scores or features, got ${output}`);
if (output === "features" && inputShape.length !== 2) usage("--output features reads [samples, 3]: a sensor, or --shape 0,3");
const outputShape = output === "features" ? [4 * 3 + 1] : [];
const model = output === "features"
  ? { name: "window-stats-js", version: "1.0.0" }
  : { name: inputShape.length === 1 ? "energy-bands-js" : "motion-energy-js", version: "1.0.0" };

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
const labels = output === "features" ? [] : bands.map((b) => b[0]);
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

// What a per-row shape means here: [samples, channels] of a sensor, or a features vector.
function describe(shape) {
  const size = (n) => (n ? String(n) : "any");
  return shape.length === 2 ? `${size(shape[0])} samples x ${size(shape[1])} channels` : `${size(shape[0])} features`;
}

// The input of one subtask, checked against `inputShape` (0 = any size): the whole array
// of a `subtask`, or row `row` of a `subtask_batch`'s [rows, ...] array.
function inputOf(wire, row = null) {
  if (!wire) throw new Error(`no input "${input}"`);
  const { shape, view } = checkArray(wire, "float32", inputShape.length + (row === null ? 0 : 1));
  const rowShape = row === null ? shape : shape.slice(1);
  if (!rowShape.every((n, axis) => inputShape[axis] === 0 || inputShape[axis] === n)) {
    throw new Error(`input "${input}" must be ${describe(inputShape)}, got ${describe(rowShape)}`);
  }
  const size = rowShape.reduce((a, b) => a * b, 1);
  const offset = row === null ? 0 : row * size * 4;
  const values = new Float32Array(size);
  for (let i = 0; i < size; i++) values[i] = view.getFloat32(offset + i * 4, true);
  return { shape: rowShape, values };
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
    return [{ ...message, input: inputOf(message.inputs?.[input]) }];
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
    input: inputOf(message.inputs?.[input], i),
  }));
}

function float32Vector(values) {
  const bytes = new Uint8Array(values.length * 4);
  const view = new DataView(bytes.buffer);
  values.forEach((v, i) => view.setFloat32(i * 4, v, true));
  return { dtype: "float32", shape: [values.length], data: bytes };
}

// --- the model: a batch function like any fusebus agent's -----------------------------------
const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
const std = (xs) => {
  const m = mean(xs);
  return Math.sqrt(mean(xs.map((x) => (x - m) ** 2)));
};

// The standard deviation of the magnitude of [samples, 3] values.
function motionEnergy(values) {
  const magnitude = [];
  for (let r = 0; r < values.length; r += 3) {
    magnitude.push(Math.hypot(values[r], values[r + 1], values[r + 2]));
  }
  return std(magnitude);
}

// Per channel mean, std, min and max (each statistic for all 3 channels in turn), then the
// motion energy: the features a window-statistics stage gives.
function windowStats(values) {
  const channels = [0, 1, 2].map((c) => Array.from(values).filter((_, i) => i % 3 === c));
  const stats = [mean, std, (xs) => Math.min(...xs), (xs) => Math.max(...xs)];
  return [...stats.flatMap((stat) => channels.map(stat)), motionEnergy(values)];
}

function predict({ shape, values }) {
  if (output === "features") return windowStats(values);
  // A 1-D input is features whose last entry is the motion energy.
  const energy = shape.length === 1 ? values[values.length - 1] : motionEnergy(values);
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
        agent_id: agentId, model,
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
  agent_id: agentId, type, model, runtime: "node",
  inputs: [reads === null
    ? { sensor, samples: 0, channels: 3 }
    : { sensor: reads, samples: 0, channels: 0, stage: true, shape: inputShape, optional: false }],
  labels, weight, output, output_shape: outputShape,
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
