"""nextstate.core: what the proxy and the learner share; imports neither of them."""
