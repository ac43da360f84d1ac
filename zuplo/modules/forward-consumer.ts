import { ZuploRequest, type ZuploContext } from "@zuplo/runtime";

interface ForwardConsumerOptions {
  consumerHeader: string;
  scopesHeader: string;
}

/**
 * Names the consumer the API-key policy authenticated, for the service's gateway-trusted
 * identity (GATEWAY_IDENTITY_ENABLED): `consumerHeader` gets the consumer's subject and
 * `scopesHeader` the `scopes` of its metadata (a list or a space-separated string).
 *
 * Whatever the client sent in those headers is removed first, so a caller cannot name someone
 * else; the service believes them only next to the gateway secret, which the client never has.
 * The consumer's Zuplo key is removed too: the service has no use for it, and a credential that
 * never reaches the backend cannot leak from its logs.
 */
export default async function forwardConsumer(
  request: ZuploRequest,
  context: ZuploContext,
  options: ForwardConsumerOptions,
  _policyName: string,
): Promise<ZuploRequest> {
  const headers = new Headers(request.headers);
  headers.delete(options.consumerHeader);
  headers.delete(options.scopesHeader);
  const user = request.user;
  if (user?.sub) {
    headers.set(options.consumerHeader, user.sub);
    const scopes: unknown = user.data?.scopes;
    if (Array.isArray(scopes)) {
      headers.set(options.scopesHeader, scopes.map(String).join(" "));
    } else if (typeof scopes === "string") {
      headers.set(options.scopesHeader, scopes);
    }
    headers.delete("authorization");
    context.log.debug(`forwarding consumer ${user.sub}`);
  }
  return new ZuploRequest(request, { headers, user });
}
