// Starts a flow and follows its execution to the end, written from schemas/asyncapi.yaml alone:
// exchange names, routing keys, required AMQP properties, the status-queue naming rule and the
// JSON Schemas all come from the document; nothing here imports the orchestrator.
//
//   AMQP_URL=amqp://orchestrator.tenant.acme:SECRET@localhost/ \
//     node start-and-follow.mjs acme nightly-sync '{"day": "2026-12-01"}'
//
// Prints one JSON line per status event of the execution (each validated against the
// StatusEvent schema and its type's data schema), then exits 0 if it succeeded, 1 if it was
// refused, failed, compensated or cancelled, 2 on bad usage or an invalid event, 124 on timeout.

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";
import amqp from "amqplib";
import YAML from "yaml";

const here = dirname(fileURLToPath(import.meta.url));
const ASYNCAPI = process.env.ASYNCAPI_FILE ?? resolve(here, "../../schemas/asyncapi.yaml");
const TIMEOUT_S = Number(process.env.TIMEOUT_S ?? 60);
const TERMINAL = new Set(["succeeded", "failed", "compensated", "cancelled"]);

function usage(message) {
  console.error(`error: ${message}`);
  console.error("usage: AMQP_URL=... node start-and-follow.mjs TENANT FLOW [INPUT_JSON]");
  process.exit(2);
}

// ------------------------------------------------------------------ the contract
const doc = YAML.parse(readFileSync(ASYNCAPI, "utf8"));

/** The channel a message of `name` (e.g. flow.start.requested) is published on. */
function publishedChannel(name) {
  for (const operation of Object.values(doc.operations)) {
    if (operation.action !== "send") continue;
    const channel = resolveRef(operation.channel.$ref);
    for (const ref of Object.values(channel.messages ?? {})) {
      if (resolveRef(ref.$ref).name === name) return channel;
    }
  }
  throw new Error(`the AsyncAPI document publishes no ${name}`);
}

function resolveRef(ref) {
  return ref
    .replace(/^#\//, "")
    .split("/")
    .reduce((node, part) => node[part], doc);
}

function messageNamed(name) {
  const found = Object.values(doc.components.messages).find((m) => m.name === name);
  if (!found) throw new Error(`no message ${name} in the AsyncAPI document`);
  return found;
}

const ajv = new Ajv2020({ strict: false, allErrors: true });
addFormats(ajv);
ajv.addSchema({ $id: "urn:orchestrator:asyncapi", components: doc.components });
const validator = (ref) => ajv.compile({ $ref: `urn:orchestrator:asyncapi${ref}` });

const startMessage = messageNamed("flow.start.requested");
const statusMessage = messageNamed("status");
const validateStart = validator(startMessage.payload.$ref);
const validateEvent = validator(statusMessage.payload.$ref);
const dataValidators = Object.fromEntries(
  Object.entries(statusMessage["x-data-schemas"]).map(([type, s]) => [type, validator(s.$ref)]),
);
const startChannel = publishedChannel("flow.start.requested");
const statusChannel = publishedChannel("status");

// "flow.start.{tenant}" -> "flow.start.acme"
const address = (channel, params) =>
  channel.address.replace(/\{(\w+)\}/g, (_, name) => {
    if (!(name in params)) throw new Error(`no value for {${name}} in ${channel.address}`);
    return params[name];
  });

// ------------------------------------------------------------------ the run
const [tenant, flow, inputJson = "{}"] = process.argv.slice(2);
if (!tenant || !flow) usage("TENANT and FLOW are required");
const url = process.env.AMQP_URL;
if (!url) usage("AMQP_URL is not set");
let input;
try {
  input = JSON.parse(inputJson);
} catch (error) {
  usage(`INPUT_JSON: ${error.message}`);
}

const user = decodeURIComponent(new URL(url).username || "guest");
const connection = await amqp.connect(url);
const channel = await connection.createConfirmChannel();
const timer = setTimeout(() => {
  console.error(`error: no terminal event within ${TIMEOUT_S} s`);
  process.exit(124);
}, TIMEOUT_S * 1000);

// A status queue named as the document says tenant accounts may name theirs, bound to the
// flow's events and to refusals that could not name the flow, before the request goes out.
const queueName = `status.${tenant}.node-${randomUUID().slice(0, 12)}`;
await channel.assertQueue(queueName, { exclusive: true, autoDelete: true, durable: false });
const statusExchange = statusChannel.bindings.amqp.exchange.name;
for (const key of [`${tenant}.${flow}.#`, `${tenant}._.flow_start.rejected`]) {
  await channel.bindQueue(queueName, statusExchange, key);
}

const request = {
  tenant,
  flow_id: flow,
  idempotency_key: `node-${randomUUID()}`,
  input,
  requested_by: "node-example",
};
if (!validateStart(request)) usage(`invalid request: ${ajv.errorsText(validateStart.errors)}`);
const messageId = `start:${tenant}:${flow}:${request.idempotency_key}`;
let executionId = null;

const done = new Promise((resolveDone) => {
  channel.consume(
    queueName,
    (message) => {
      const event = JSON.parse(message.content.toString("utf8"));
      channel.ack(message);
      if (!validateEvent(event)) {
        console.error(`error: invalid status event: ${ajv.errorsText(validateEvent.errors)}`);
        resolveDone(2);
        return;
      }
      const checkData = dataValidators[event.type];
      if (!checkData || !checkData(event.data ?? {})) {
        const why = checkData ? ajv.errorsText(checkData.errors) : "no data schema";
        console.error(`error: ${event.type} data: ${why}`);
        resolveDone(2);
        return;
      }
      const kind = event.type.replace(/^io\.orchestrator\./, "");
      if (kind === "flow_start.rejected" && event.data.message_id === messageId) {
        console.log(JSON.stringify(event));
        console.error(`refused: ${event.data.reason}: ${event.data.detail}`);
        resolveDone(1);
      } else if (
        kind === "flow_start.accepted" &&
        event.data.idempotency_key === request.idempotency_key
      ) {
        executionId = event.data.execution_id;
        console.log(JSON.stringify(event));
      } else if (executionId && event.subject === executionId) {
        console.log(JSON.stringify(event));
        const [entity, state] = kind.split(".");
        if (entity === "execution" && TERMINAL.has(state)) resolveDone(state === "succeeded" ? 0 : 1);
      }
    },
    { noAck: false },
  );
});

// The required properties, as x-amqp-properties lists them: content type, message type,
// persistent delivery, a message id, and user_id (the broker checks it is really us).
channel.on("return", () => {
  console.error(`error: nothing takes flow starts of tenant ${tenant} (it has no flows)`);
  process.exit(1);
});
const properties = {
  contentType: startMessage.contentType,
  type: startMessage.bindings.amqp.messageType,
  persistent: true,
  messageId,
  userId: user,
  timestamp: Math.floor(Date.now() / 1000),
  mandatory: true,
};
channel.publish(
  startChannel.bindings.amqp.exchange.name,
  address(startChannel, { tenant }),
  Buffer.from(JSON.stringify(request)),
  properties,
);
await channel.waitForConfirms();

const code = await done;
clearTimeout(timer);
await connection.close();
process.exit(code);
