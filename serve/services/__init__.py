"""agentloop.serve.services: what the gateway does, as plain objects callable without HTTP.

`chat.ChatService` is the chat-completion path (resolve the version, prepare the
engine body, call the engine pool, fix the answer, log it); `feedback` holds the
feedback rules and writes; `loop.LoopRunner` starts learning-loop iterations
(rl/loop.py) with the serving hooks they need. Each takes its collaborators in its
constructor (see serve/compose.py); the HTTP edge only converts.
"""
