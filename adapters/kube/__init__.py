"""The Kubernetes side: the CanaryDeployment resource and, later, the API client."""
