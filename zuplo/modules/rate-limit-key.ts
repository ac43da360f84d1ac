import type {
  CustomRateLimitDetails,
  ZuploContext,
  ZuploRequest,
} from "@zuplo/runtime";

/**
 * The rate-limit bucket of a request: the consumer the API-key policy authenticated, or the
 * client's IP when there is none (a caller using the service's own keys, or no key at all).
 * The IP comes from Zuplo's edge, never from a header the client could set.
 */
export function rateLimitKey(
  request: ZuploRequest,
  context: ZuploContext,
  _policyName: string,
): CustomRateLimitDetails {
  const consumer = request.user?.sub;
  if (consumer) {
    return { key: `consumer:${consumer}` };
  }
  return { key: `ip:${context.incomingRequestProperties.ip ?? "unknown"}` };
}
