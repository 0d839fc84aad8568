"""The personalization experiment in miniature (the OpenClaw-RL paper's setup, scaled down).

``styles`` is the shared vocabulary: word problems, replies in four style attributes, their
detectors and the wordings a user asks for them with. ``pretrain`` teaches the toy model
(``nextstate.learner.toy_model``) to answer in that vocabulary and to follow instructions,
so the learner has something to sharpen:

    styles (problems, replies, phrases)  ->  pretrain (synthetic conversations, training)
        ->  toy_model.TRAINED_TOY  ->  vLLM  ->  simulated users  ->  proxy  ->  learner
"""
