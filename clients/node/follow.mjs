#!/usr/bin/env node
// Lists the caller's accounts, then (with --watch) follows one account's feed, one JSON line per account and event.
//
//   node clients/node/follow.mjs --target 127.0.0.1:50051 --ca ca.pem --cert client.pem --key client-key.pem \
//       [--watch accounts/ID [--events N] [--heartbeat SECONDS] [--resume-token TOKEN]]
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { toJson } from "@bufbuild/protobuf";
import { MailboxEventSchema } from "../../generated/ts/mailbroker/v1/mail_service_pb.js";
import { connect, follow } from "./mailbroker.mjs";

const { values } = parseArgs({
  options: {
    target: { type: "string" },
    ca: { type: "string" },
    cert: { type: "string" },
    key: { type: "string" },
    watch: { type: "string" },
    events: { type: "string", default: "0" },
    heartbeat: { type: "string" },
    "resume-token": { type: "string", default: "" },
  },
});
for (const required of ["target", "ca", "cert", "key"]) {
  if (!values[required]) {
    console.error(`follow.mjs: --${required} is required`);
    process.exit(2);
  }
}

const broker = connect(values.target, {
  ca: readFileSync(values.ca),
  cert: readFileSync(values.cert),
  key: readFileSync(values.key),
});
try {
  let pageToken = "";
  do {
    const page = await broker.accounts.listAccounts({ pageToken }, { deadline: Date.now() + 10000 });
    for (const account of page.accounts) {
      console.log(JSON.stringify({ account: account.name, emailAddress: account.emailAddress }));
    }
    pageToken = page.nextPageToken;
  } while (pageToken);

  if (values.watch) {
    const limit = Number(values.events);
    let seen = 0;
    const options = { resumeToken: values["resume-token"], heartbeatSeconds: values.heartbeat };
    for await (const event of follow(broker, values.watch, options)) {
      console.log(JSON.stringify({ kind: event.event.case, event: toJson(MailboxEventSchema, event) }));
      seen += 1;
      if (limit && seen >= limit) break;
    }
  }
} catch (error) {
  console.error(`follow.mjs: ${error.code !== undefined ? `gRPC status ${error.code}: ` : ""}${error.details ?? error.message}`);
  process.exitCode = 1;
} finally {
  broker.close();
}
