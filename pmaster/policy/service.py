"""``policy-service``: a client of Postfix's policy delegation protocol (SMTPD_POLICY_README), asked at RCPT.

(Being built: this commit only wires the chain position; the key is still refused by the configuration.)
"""

from typing import Any, List

from pmaster.errors import PmasterError
from pmaster.policy.chain import Check, Resources


def checks(smtpd: Any, config: Any, resources: Resources) -> List[Check]:
    if smtpd.policy_service is None:
        return []
    raise PmasterError("[smtpd %s] policy-service is not supported yet" % smtpd.ident)
