"""C51 (Bellemare et al., 2017): DQN's agent with a network that outputs a categorical distribution of each
action's return over fixed atoms."""
