"""Checks in the SMTP dialogue (SPEC 6): one ``Chain`` per listener, asked by the session at each stage.

``chain`` holds the chain, its ``Outcome`` and the extension table of check factories; ``callables`` the
``policy = module:function`` checks; ``service`` the Postfix policy delegation client (inet, unix, exec).
"""
