"""Traffic routers for Kubernetes: the engine's `TrafficRouter` port over the user's objects.

- `istio.IstioRouter`: the weights of a VirtualService route (host- or
  subset-based);
- `nginx_ingress.NginxIngressRouter`: ingress-nginx's canary Ingress;
- `gateway_api.GatewayApiRouter`: weighted backendRefs of an HTTPRoute;
- `errors`: the error every router raises about a missing or malformed
  object, and the conflict retry and revert detection they share.

Each router takes a `kubernetes.aio` `ApiClient`, finds its objects in the
rollout's namespace, writes only when the object does not already have the
weights, reads the weight back from the API, and reports a weight someone
else put back. The composition root picks one by the CanaryDeployment's
`spec.traffic.provider`. This package imports no other adapter.
"""
