"""Language-model policies: models, tasks, rewards and rollouts on the shared core."""
