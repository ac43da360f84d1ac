import type { ZuploContext, ZuploRequest } from "@zuplo/runtime";

interface Consumer {
  sub: string;
  scopes?: string[];
}

interface TestConsumerAuthOptions {
  /** API key -> the consumer it belongs to, as Zuplo's key service would store it. */
  consumers: Record<string, Consumer>;
}

/**
 * Stands in for api-key-inbound in the end-to-end test: that policy needs Zuplo's cloud key
 * service, this one reads the keys from its options. It behaves as the real policy does with
 * `allowUnauthenticatedRequests: true`: a known `Authorization: Bearer <key>` sets
 * `request.user` = { sub, data: { scopes } } (a consumer's subject and metadata), anything else
 * passes through anonymous.
 */
export default async function testConsumerAuth(
  request: ZuploRequest,
  _context: ZuploContext,
  options: TestConsumerAuthOptions,
  _policyName: string,
): Promise<ZuploRequest> {
  const authorization = request.headers.get("authorization") ?? "";
  const key = authorization.startsWith("Bearer ") ? authorization.slice(7) : "";
  const consumer = options.consumers[key];
  if (consumer) {
    request.user = { sub: consumer.sub, data: { scopes: consumer.scopes } };
  }
  return request;
}
