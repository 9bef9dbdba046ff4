"""Gymnasium vector envs and the observation and reward transforms around them."""
