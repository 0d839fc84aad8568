"""The personalization experiment in miniature (the OpenClaw-RL paper's setup, scaled down).

``styles`` is the shared vocabulary: word problems, replies in four style attributes, their
detectors and the fixed wordings a user asks for them with; ``wording`` is a grammar of
instructions split into a train part and a held-out part. ``pretrain`` teaches the toy
model (``nextstate.learner.toy_model``) to answer in that vocabulary and to follow
instructions in the train part, so the learner has something to sharpen; personas that
speak in the held-out part measure whether it learns from words the model never saw in
an instruction (``following`` measures the model's hint following itself):

    styles, wording (train)  ->  pretrain (synthetic conversations, training)
        ->  pretrain.TRAINED_TOY  ->  vLLM  ->  simulated users  ->  proxy  ->  learner
"""
