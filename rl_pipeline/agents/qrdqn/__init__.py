"""QR-DQN (Dabney et al., 2018): DQN's agent with a network that outputs quantiles of each action's return."""
