"""Experience: collecting it from vector envs, exploring, n-step returns, replay buffers and their frames."""
