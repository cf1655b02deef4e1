"""Classic-control policies and rollouts on Gymnasium environments."""
