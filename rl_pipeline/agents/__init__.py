"""The RL core's agents: LightningModules that act, learn from replayed batches and are evaluated."""
