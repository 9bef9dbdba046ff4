"""DQN (Mnih et al., 2015) and its TD-loss family: double, n-step, prioritized."""
