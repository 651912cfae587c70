"""The teacher's roles: each role's request (requests.py: template + model + output schema), its typed
call through the gateway (calls.py), and its reply parsed as untrusted data (explainer.py, referee.py,
generator.py, json_reply.py); prompt templates and inert data blocks (template.py, lookalikes.py); what
an item is (items.py), what a role reads from an input row (inputs.py), and when a role's replies are
unusable (replies.py). Roles call the teacher only through agentkd.gateway.

Must not import: agentkd.batches, agentkd.session, agentkd.workpool, agentkd.run_status, agentkd.lion,
agentkd.training, agentkd.cli, agentkd.teach, agentkd.estimate, agentkd.inference, agentkd.watch.
"""
