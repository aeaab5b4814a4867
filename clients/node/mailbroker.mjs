// mailbroker for Node: @grpc/grpc-js clients built from the generated stubs (generated/ts, protoc-gen-es), over one
// mutual-TLS channel, and a feed that resumes from its last token.
//
//   import { connect, follow } from "./mailbroker.mjs";
//   const broker = connect("broker.internal:50051", { ca, cert, key });   // PEM Buffers
//   const page = await broker.accounts.listAccounts({});
//   for await (const event of follow(broker, page.accounts[0].name)) { ... }
import * as grpc from "@grpc/grpc-js";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { AccountService } from "../../generated/ts/mailbroker/v1/account_service_pb.js";
import { MailService } from "../../generated/ts/mailbroker/v1/mail_service_pb.js";

// A grpc-js service definition from a protobuf-es service descriptor: binary protobuf on the wire, plain objects or
// messages in, messages out.
export function serviceDefinition(service) {
  const definition = {};
  for (const method of service.methods) {
    definition[method.localName] = {
      path: `/${service.typeName}/${method.name}`,
      requestStream: method.methodKind === "client_streaming" || method.methodKind === "bidi_streaming",
      responseStream: method.methodKind === "server_streaming" || method.methodKind === "bidi_streaming",
      requestSerialize: (message) => Buffer.from(toBinary(method.input, create(method.input, message))),
      requestDeserialize: (bytes) => fromBinary(method.input, bytes),
      responseSerialize: (message) => Buffer.from(toBinary(method.output, message)),
      responseDeserialize: (bytes) => fromBinary(method.output, bytes),
      originalName: method.name,
    };
  }
  return definition;
}

// Unary methods as promises (accounts.listAccounts(request, { deadline })), streaming ones as grpc-js streams.
function promised(client, service) {
  const wrapped = { raw: client };
  for (const method of service.methods) {
    const call = client[method.localName].bind(client);
    wrapped[method.localName] =
      method.methodKind === "unary"
        ? (request = {}, options = {}) =>
            new Promise((resolve, reject) =>
              call(request, new grpc.Metadata(), options, (error, response) => (error ? reject(error) : resolve(response))),
            )
        : (request = {}, options = {}) => call(request, new grpc.Metadata(), options);
  }
  return wrapped;
}

// One channel for both services; keep it for the life of the process (an mTLS handshake costs milliseconds).
export function connect(target, { ca, cert, key, options = {} }) {
  const credentials = grpc.credentials.createSsl(ca, key, cert);
  const Accounts = grpc.makeGenericClientConstructor(serviceDefinition(AccountService), "AccountService");
  const Mail = grpc.makeGenericClientConstructor(serviceDefinition(MailService), "MailService");
  const accounts = new Accounts(target, credentials, options);
  const mail = new Mail(target, credentials, { ...options, channelOverride: accounts.getChannel() });
  return {
    accounts: promised(accounts, AccountService),
    mail: promised(mail, MailService),
    close: () => accounts.close(),
  };
}

// Yields the account's events (heartbeats and resync_required included: on a resync, list afresh, then go on). On
// UNAVAILABLE (a broker shutting down, a dropped connection) it reconnects from the last resume token after a
// jittered, growing delay; other errors are thrown. Breaking out of the loop cancels the call.
export async function* follow(broker, account, { resumeToken = "", heartbeatSeconds, maxDelayMs = 30000 } = {}) {
  let token = resumeToken;
  let failures = 0;
  for (;;) {
    const request = { account, resumeToken: token };
    if (heartbeatSeconds) request.heartbeatInterval = { seconds: BigInt(heartbeatSeconds) };
    const call = broker.mail.watchMailbox(request);
    try {
      for await (const event of call) {
        failures = 0;
        if (event.resumeToken) token = event.resumeToken;
        yield event;
      }
      return;
    } catch (error) {
      if (error.code !== grpc.status.UNAVAILABLE) throw error;
    } finally {
      call.cancel();
    }
    const delay = Math.random() * Math.min(maxDelayMs, 500 * 2 ** failures);
    failures += 1;
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}
