"""The kubellm operator: reconciles LLMDeployments into Deployments, Services and the rest, and autoscales them."""
