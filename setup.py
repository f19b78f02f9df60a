"""Postmaster: an ESMTP mail transfer agent for small sites, relay hosts and boxes that must just send mail."""

from setuptools import find_packages, setup

setup(
    name="pmaster",
    version="0.1.0",
    description="Postmaster: an ESMTP mail transfer agent that is easy to read and configure",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(exclude=["pmaster.tests"]),
    package_data={"pmaster.web": ["static/*.css", "static/*.js"]},
    install_requires=[
        "ply", "pyOpenSSL", "prometheus-client", "dnspython", "pyspf",
        # SPEC: passlib for password hashes; its maintained fork libpass (same import name) from Python 3.9.
        "passlib; python_version < '3.9'", "libpass; python_version >= '3.9'",
    ],
    extras_require={
        # passlib 1.7.4 (the one for Python 3.8) fails with bcrypt 4.1 and newer (its self-test hashes > 72 bytes).
        "bcrypt": ["bcrypt<4.1; python_version < '3.9'", "bcrypt; python_version >= '3.9'"],
        "argon2": ["argon2-cffi"],
        "test": ["pytest", "pytest-xdist", "trustme", "hypothesis", "dnslib", "ruff", "vermin", "selenium",
                 "bcrypt<4.1; python_version < '3.9'", "bcrypt; python_version >= '3.9'", "argon2-cffi"],
    },
    entry_points={"console_scripts": ["pmaster = pmaster.cli:main"]},
    data_files=[("share/pmaster", ["conf/postmaster.cf.example"])],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Email :: Mail Transport Agents",
        "Operating System :: POSIX",
    ],
)
