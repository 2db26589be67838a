"""The kubellm gateway: one front door for every LLMDeployment (route by model and by prefix, hold while a model
scales from zero). It never imports the runtime's engine or torch."""
