// A thin, promise-based client of the feature store over gRPC (Connect's Node transport),
// on the messages and service descriptors generated from proto/ (`npm run generate`).
// Every call has a deadline; every failure is a FeatureStoreError carrying the gRPC code
// and, when the write-time policy refused the whole request, its reason.

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient, type Client as ConnectClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import * as pb from "../gen/featurestore/v1/featurestore_pb.js";

export { pb, Code };

/** How to reach and authenticate to a server. */
export interface ClientOptions {
  /** The principal's bearer token. */
  token?: string;
  /** TLS: the authority that signed the server's certificate, and for mutual TLS the
   * client's certificate and key (PEM). */
  tls?: { ca: string | Buffer; cert?: string | Buffer; key?: string | Buffer; serverName?: string };
  /** Deadline of every call unless the call gives its own, in milliseconds (5,000). */
  timeoutMs?: number;
}

/** Options of one call. */
export interface CallOptions {
  timeoutMs?: number;
  /** Sent as `x-request-id`; the server's log lines for the call carry it. */
  requestId?: string;
}

/** A failed call: `code` is the gRPC code (`Code.InvalidArgument`, ...); `reason` the
 * policy's reason code name (e.g. "STALE_GENERATION") when the write-time policy refused
 * the whole request, with `metadata` (`row`, `current_generation`). */
export class FeatureStoreError extends Error {
  constructor(
    readonly code: Code,
    message: string,
    readonly reason: string | undefined,
    readonly metadata: Record<string, string>,
    readonly requestId: string | undefined,
  ) {
    super(`${Code[code]}: ${message}`);
    this.name = "FeatureStoreError";
  }

  static from(error: unknown): FeatureStoreError {
    const connect = ConnectError.from(error);
    let reason: string | undefined;
    let metadata: Record<string, string> = {};
    for (const detail of connect.details) {
      // Details the client has no schema for arrive as their type name and bytes.
      if ("type" in detail && detail.type === "google.rpc.ErrorInfo" && detail.value instanceof Uint8Array) {
        [reason, metadata] = decodeErrorInfo(detail.value);
      }
    }
    const requestId = connect.metadata.get("x-request-id") ?? undefined;
    return new FeatureStoreError(connect.code, connect.rawMessage, reason, metadata, requestId);
  }
}

/** google.rpc.ErrorInfo: reason = 1, domain = 2, metadata = 3 (map<string, string>). */
function decodeErrorInfo(bytes: Uint8Array): [string | undefined, Record<string, string>] {
  const reader = new BinaryReader(bytes);
  let reason: string | undefined;
  const metadata: Record<string, string> = {};
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === 1) {
      reason = reader.string();
    } else if (field === 3) {
      const entry = new BinaryReader(reader.bytes());
      let key = "";
      let value = "";
      while (entry.pos < entry.len) {
        const [entryField, entryType] = entry.tag();
        if (entryField === 1) key = entry.string();
        else if (entryField === 2) value = entry.string();
        else entry.skip(entryType);
      }
      metadata[key] = value;
    } else {
      reader.skip(wireType);
    }
  }
  return [reason || undefined, metadata];
}

/** A feature value: a number (float), a bigint (int64), a string, an array of numbers
 * (a vector) or a map of topic to weight (a sparse map). */
export type FeatureInput = number | bigint | string | number[] | Record<string, number>;

/** One row of a write. `interactionTimeUnixMicros` defaults to now. */
export interface WriteRowInput {
  userId: number | bigint;
  surfaces: string[];
  source: string;
  originApp: string;
  producerId: string;
  features: Record<string, FeatureInput>;
  interactionTimeUnixMicros?: bigint;
  microphonePermissionGranted?: boolean;
  userStateGeneration?: number | bigint;
}

function featureValue(name: string, value: FeatureInput): MessageInitShape<typeof pb.FeatureValueSchema> {
  if (typeof value === "number") return { name, value: { case: "floatValue", value } };
  if (typeof value === "bigint") return { name, value: { case: "int64Value", value } };
  if (typeof value === "string") return { name, value: { case: "stringValue", value } };
  if (Array.isArray(value)) return { name, value: { case: "vectorValue", value: { values: value } } };
  return {
    name,
    value: { case: "sparseValue", value: { topics: Object.keys(value), weights: Object.values(value) } },
  };
}

function writeRow(row: WriteRowInput): MessageInitShape<typeof pb.WriteRowSchema> {
  return {
    userId: BigInt(row.userId),
    targetSurfaces: row.surfaces,
    provenance: {
      source: row.source,
      originApp: row.originApp,
      producerId: row.producerId,
      interactionTimeUnixMicros: row.interactionTimeUnixMicros ?? BigInt(Date.now()) * 1000n,
      microphonePermissionGranted: row.microphonePermissionGranted ?? false,
    },
    features: Object.entries(row.features).map(([name, value]) => featureValue(name, value)),
    userStateGeneration: BigInt(row.userStateGeneration ?? 0),
  };
}

const enumName = (values: Record<number, string>, prefix: string, value: number) =>
  (values[value] ?? String(value)).replace(prefix, "");

/** One key's answer: `status` is "OK", "UNKNOWN_SURFACE", "DATA_LOSS" or "UNAVAILABLE"; `values` maps each
 * feature to its value (undefined where nothing is served); `statuses` to its value
 * status ("PRESENT", "NOT_FOUND", "EXPIRED", "DEFAULTED", ...). */
export interface Row {
  userId: bigint;
  surface: string;
  status: string;
  values: Record<string, unknown>;
  statuses: Record<string, string>;
}

/** The answer to a read: one Row per key in request order, and matrices of features. */
export class ReadResult {
  readonly rows: Row[];

  constructor(keys: [bigint, string][], readonly response: pb.GetFeaturesResponse) {
    this.rows = response.rows.map((row, index) => {
      const values: Record<string, unknown> = {};
      const statuses: Record<string, string> = {};
      response.columns.forEach((column, columnIndex) => {
        const status = row.statuses[columnIndex] ?? pb.ValueStatus.UNSPECIFIED;
        statuses[column.name] = pb.ValueStatus[status];
        const served = status === pb.ValueStatus.PRESENT || status === pb.ValueStatus.DEFAULTED;
        values[column.name] = served ? cell(row, column) : undefined;
      });
      return { userId: keys[index][0], surface: keys[index][1], status: pb.RowStatus[row.status], values, statuses };
    });
  }

  /** A FLOAT or INT64 feature for every key (NaN where nothing is served), or a
   * FLOAT_VECTOR feature as one row of `dimension` numbers per key. */
  matrix(feature: string): Float64Array | Float64Array[] {
    const index = this.response.columns.findIndex((column) => column.name === feature);
    if (index < 0) throw new Error(`${feature} is not a column of this read`);
    const column = this.response.columns[index];
    const served = (row: pb.FeatureRow) =>
      row.statuses[index] === pb.ValueStatus.PRESENT || row.statuses[index] === pb.ValueStatus.DEFAULTED;
    switch (column.valueType) {
      case pb.ValueType.FLOAT:
        return Float64Array.from(this.response.rows, (row) => (served(row) ? row.floatValues[column.offset] : NaN));
      case pb.ValueType.INT64:
        return Float64Array.from(this.response.rows, (row) =>
          served(row) ? Number(row.int64Values[column.offset]) : NaN,
        );
      case pb.ValueType.FLOAT_VECTOR:
        return this.response.rows.map((row) =>
          served(row)
            ? Float64Array.from(row.floatValues.slice(column.offset, column.offset + column.dimension))
            : new Float64Array(column.dimension).fill(NaN),
        );
      default:
        throw new TypeError(`${feature} is a ${pb.ValueType[column.valueType]} feature, not numeric`);
    }
  }
}

function cell(row: pb.FeatureRow, column: pb.FeatureColumn): unknown {
  switch (column.valueType) {
    case pb.ValueType.FLOAT:
      return row.floatValues[column.offset];
    case pb.ValueType.FLOAT_VECTOR:
      return row.floatValues.slice(column.offset, column.offset + column.dimension);
    case pb.ValueType.INT64:
      return row.int64Values[column.offset];
    case pb.ValueType.STRING:
      return row.stringValues[column.offset];
    case pb.ValueType.SPARSE: {
      const sparse = row.sparseValues[column.offset];
      return Object.fromEntries(sparse.topics.map((topic, i) => [topic, sparse.weights[i]]));
    }
    default:
      return undefined;
  }
}

/** What became of one feature value of a write. */
export interface Verdict {
  feature: string;
  /** "ALLOW", "ALLOW_WITH_TRANSFORM" or "DENY". */
  verdict: string;
  /** Reason code names, e.g. "SENSITIVE_TOPIC_FOR_ADS". */
  reasons: string[];
  /** Per target surface: "STORED", "SUPERSEDED", "REFUSED" ("ADMITTED" when explained). */
  outcomes: Record<string, string>;
}

export interface WriteResult {
  rows: Verdict[][];
  replayed: boolean;
  policyBundleHash: string;
}

function verdicts(response: pb.WriteFeaturesResponse): Verdict[][] {
  return response.rows.map((row) =>
    row.verdicts.map((verdict) => ({
      feature: verdict.feature,
      verdict: enumName(pb.Verdict, "", verdict.verdict),
      reasons: verdict.reasons.map((reason) => pb.ReasonCode[reason]),
      outcomes: Object.fromEntries(verdict.surfaces.map((surface) => [surface.surface, pb.Outcome[surface.outcome]])),
    })),
  );
}

/** A connection to a feature store server at `baseUrl` ("http://host:port", or
 * "https://host:port" with `tls`). */
export class Client {
  private readonly store: ConnectClient<typeof pb.FeatureStore>;
  private readonly privacy: ConnectClient<typeof pb.Privacy>;
  private readonly admin: ConnectClient<typeof pb.Admin>;
  private readonly timeoutMs: number;

  constructor(baseUrl: string, options: ClientOptions = {}) {
    const interceptors: Interceptor[] = [];
    if (options.token) {
      const token = options.token;
      interceptors.push((next) => async (request) => {
        request.header.set("authorization", `Bearer ${token}`);
        return next(request);
      });
    }
    if (options.tls?.cert !== undefined && options.tls.key === undefined) {
      throw new Error("a client certificate needs its key");
    }
    const transport = createGrpcTransport({
      baseUrl,
      interceptors,
      nodeOptions: options.tls
        ? { ca: options.tls.ca, cert: options.tls.cert, key: options.tls.key, servername: options.tls.serverName }
        : undefined,
    });
    this.store = createClient(pb.FeatureStore, transport);
    this.privacy = createClient(pb.Privacy, transport);
    this.admin = createClient(pb.Admin, transport);
    this.timeoutMs = options.timeoutMs ?? 5000;
  }

  private async call<T>(send: (options: { timeoutMs: number; headers: Record<string, string> }) => Promise<T>, options: CallOptions = {}): Promise<T> {
    const headers: Record<string, string> = {};
    if (options.requestId) headers["x-request-id"] = options.requestId;
    try {
      return await send({ timeoutMs: options.timeoutMs ?? this.timeoutMs, headers });
    } catch (error) {
      throw FeatureStoreError.from(error);
    }
  }

  /** Reads `features` (every feature of the keys' surfaces when empty) for each
   * [userId, surface] key. */
  async getFeatures(
    keys: [number | bigint, string][],
    features: string[] = [],
    options: CallOptions & { includeEventTimes?: boolean } = {},
  ): Promise<ReadResult> {
    const wanted: [bigint, string][] = keys.map(([user, surface]) => [BigInt(user), surface]);
    const request = create(pb.GetFeaturesRequestSchema, {
      keys: wanted.map(([userId, surface]) => ({ userId, surface })),
      features,
      includeEventTimes: options.includeEventTimes ?? false,
    });
    const response = await this.call((call) => this.store.getFeatures(request, call), options);
    return new ReadResult(wanted, response);
  }

  /** Writes rows; each value is decided by the write-time policy. A retry with the same
   * `idempotencyKey` is applied once. */
  async writeFeatures(rows: WriteRowInput[], options: CallOptions & { idempotencyKey?: string } = {}): Promise<WriteResult> {
    const request = create(pb.WriteFeaturesRequestSchema, {
      idempotencyKey: options.idempotencyKey ?? crypto.randomUUID(),
      rows: rows.map(writeRow),
    });
    const response = await this.call((call) => this.store.writeFeatures(request, call), options);
    return { rows: verdicts(response), replayed: response.replayed, policyBundleHash: response.policyBundleHash };
  }

  /** Decides rows as a write would, storing nothing. */
  async explainWrite(rows: WriteRowInput[], options: CallOptions = {}): Promise<{ rows: Verdict[][]; response: pb.ExplainWriteResponse }> {
    const request = create(pb.WriteFeaturesRequestSchema, { idempotencyKey: crypto.randomUUID(), rows: rows.map(writeRow) });
    const response = await this.call((call) => this.store.explainWrite(request, call), options);
    return { rows: response.verdicts ? verdicts(response.verdicts) : [], response };
  }

  /** Sets a user's state (privacy role); `ageBand` is "ADULT", "MINOR" or "UNKNOWN". */
  async setUserState(
    userId: number | bigint,
    state: { jurisdiction: string; ageBand: "ADULT" | "MINOR" | "UNKNOWN"; linkedApps?: string[]; adsObjection?: boolean },
    options: CallOptions & { expectedGeneration?: number | bigint } = {},
  ): Promise<pb.UserState> {
    const request = create(pb.SetUserStateRequestSchema, {
      state: {
        userId: BigInt(userId),
        jurisdiction: state.jurisdiction,
        ageBand: pb.AgeBand[state.ageBand],
        linkedApps: state.linkedApps ?? [],
        adsObjection: state.adsObjection ?? false,
      },
      expectedGeneration: BigInt(options.expectedGeneration ?? 0),
    });
    return this.call((call) => this.privacy.setUserState(request, call), options);
  }

  async getUserState(userId: number | bigint, options: CallOptions = {}): Promise<pb.UserState> {
    return this.call((call) => this.privacy.getUserState({ userId: BigInt(userId) }, call), options);
  }

  /** Erases a user (privacy role) and returns the receipt. */
  async eraseUser(userId: number | bigint, options: CallOptions = {}): Promise<pb.ErasureReceipt> {
    return this.call((call) => this.privacy.eraseUser({ userId: BigInt(userId) }, call), options);
  }

  async erasureStatus(receiptId: string, options: CallOptions = {}): Promise<pb.ErasureReceipt> {
    return this.call((call) => this.privacy.getErasureStatus({ receiptId }, call), options);
  }

  /** What the server holds and runs with (admin role). */
  async stats(options: CallOptions = {}): Promise<pb.StoreStats> {
    return this.call((call) => this.admin.getStats({}, call), options);
  }
}
