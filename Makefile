# Build and install ssock (README, "Install").
#
#   make                                 cargo build --release of what is installed
#   make install PREFIX=/usr/local       install what `make` built (runs no cargo:
#                                        `make && sudo make install`)
#   make uninstall PREFIX=/usr/local     remove it again (a config in SYSCONFDIR stays)
#   make deb                             build, then a Debian package (packaging/build-deb.sh)
#
# Variables:
#   PREFIX      /usr/local by default; must be absolute
#   DESTDIR     staging root prepended to every installed path (packaging)
#   SYSCONFDIR  where ssock/devd.toml goes: /etc when PREFIX is /usr or
#               /usr/local (the path docs/operations.md and the unit name),
#               else PREFIX/etc
#   UNITDIR     the systemd unit's directory, PREFIX/lib/systemd/system
#               (systemd reads /usr/local/lib/systemd/system and
#               /usr/lib/systemd/system)
#   PROFILE     the cargo profile to build or install: release (default),
#               debug, or any other profile name
#   CARGO_TARGET_DIR  cargo's target directory (default: target); the files
#               installed come from CARGO_TARGET_DIR/PROFILE (debug for the
#               dev profile), or from BUILD_DIR if given
#
# Layout (ssock-run finds libssock.so in ../lib/ssock beside itself, and
# devd beside itself):
#   PREFIX/bin/{devd,ssock-run,ringstat,ssock-bench,ssock-ivshmem-server}
#   PREFIX/lib/ssock/libssock.so
#   UNITDIR/ssock-devd.service   ExecStart and Documentation rewritten to
#                                PREFIX/bin/devd, SYSCONFDIR/ssock/devd.toml
#                                and DOCDIR/operations.md
#   SYSCONFDIR/ssock/devd.toml   only when none is there yet
#   PREFIX/share/doc/ssock/      README.md, docs the unit and operations.md
#                                refer to, examples/devd.toml

PREFIX ?= /usr/local
DESTDIR ?=
ifneq ($(filter /usr /usr/local,$(PREFIX)),)
SYSCONFDIR ?= /etc
else
SYSCONFDIR ?= $(PREFIX)/etc
endif
UNITDIR ?= $(PREFIX)/lib/systemd/system
DOCDIR := $(PREFIX)/share/doc/ssock
# Fixed relative to PREFIX: ssock-run looks for ../lib/ssock/libssock.so.
BINDIR := $(PREFIX)/bin
SHIMDIR := $(PREFIX)/lib/ssock

# The repository (this file's directory): make -C DIR or make -f DIR/Makefile work.
SRC := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))

CARGO ?= cargo
CARGO_TARGET_DIR ?= $(SRC)/target
PROFILE ?= release
PROFILE_DIR := $(if $(filter debug dev,$(PROFILE)),debug,$(PROFILE))
CARGO_PROFILE := $(if $(filter debug dev,$(PROFILE)),,--profile $(PROFILE))
BUILD_DIR ?= $(CARGO_TARGET_DIR)/$(PROFILE_DIR)

INSTALL ?= install
BINS := devd ssock-run ringstat ssock-bench ssock-ivshmem-server
SHIM := libssock.so
UNIT := $(SRC)/packaging/ssock-devd.service
CONFIG := $(SRC)/packaging/devd.toml
DOCS := $(addprefix $(SRC)/,README.md docs/operations.md docs/config.md \
	docs/ringstat.md docs/protocol.md docs/threat-model.md)
# The crates whose binaries and libssock.so are installed.
PACKAGES := -p ssock-devd -p ssock-client -p ssock-preload -p ssock-tools

.PHONY: all build install uninstall deb check-prefix check-built

all: build

build:
	CARGO_TARGET_DIR='$(CARGO_TARGET_DIR)' $(CARGO) build --manifest-path '$(SRC)/Cargo.toml' \
	  $(CARGO_PROFILE) $(PACKAGES)

check-prefix:
	@case '$(PREFIX)' in /*) ;; *) echo "PREFIX must be an absolute path, not '$(PREFIX)'" >&2; exit 1;; esac
	@case '$(PREFIX)$(SYSCONFDIR)$(UNITDIR)' in *' '*|*'|'*) echo "PREFIX, SYSCONFDIR and UNITDIR may hold no space or '|'" >&2; exit 1;; esac
	@case '$(SYSCONFDIR)$(UNITDIR)' in /*) ;; *) echo "SYSCONFDIR and UNITDIR must be absolute paths" >&2; exit 1;; esac

check-built:
	@for f in $(BINS) $(SHIM); do \
	  if [ ! -f '$(BUILD_DIR)'/$$f ]; then \
	    echo "$(BUILD_DIR)/$$f is missing: run 'make' first (or 'make PROFILE=$(PROFILE)')" >&2; exit 1; \
	  fi; \
	done

install: check-prefix check-built
	$(INSTALL) -d '$(DESTDIR)$(BINDIR)' '$(DESTDIR)$(SHIMDIR)' '$(DESTDIR)$(UNITDIR)' \
	  '$(DESTDIR)$(DOCDIR)/examples' '$(DESTDIR)$(SYSCONFDIR)/ssock'
	$(INSTALL) -m 0755 $(addprefix '$(BUILD_DIR)'/,$(BINS)) '$(DESTDIR)$(BINDIR)/'
	$(INSTALL) -m 0644 '$(BUILD_DIR)/$(SHIM)' '$(DESTDIR)$(SHIMDIR)/$(SHIM)'
	sed -e 's|/usr/local/bin|$(BINDIR)|g' \
	    -e 's|/etc/ssock/devd.toml|$(SYSCONFDIR)/ssock/devd.toml|g' \
	    -e 's|file:///usr/share/doc/ssock/|file://$(DOCDIR)/|g' \
	    $(UNIT) > '$(DESTDIR)$(UNITDIR)/ssock-devd.service.tmp'
	@grep -qx 'ExecStart=$(BINDIR)/devd --config $(SYSCONFDIR)/ssock/devd.toml' \
	    '$(DESTDIR)$(UNITDIR)/ssock-devd.service.tmp' && \
	  grep -qx 'Documentation=file://$(DOCDIR)/operations.md' \
	    '$(DESTDIR)$(UNITDIR)/ssock-devd.service.tmp' || \
	  { echo "$(UNIT): its ExecStart or Documentation line no longer matches what this Makefile rewrites" >&2; \
	    rm -f '$(DESTDIR)$(UNITDIR)/ssock-devd.service.tmp'; exit 1; }
	chmod 0644 '$(DESTDIR)$(UNITDIR)/ssock-devd.service.tmp'
	mv '$(DESTDIR)$(UNITDIR)/ssock-devd.service.tmp' '$(DESTDIR)$(UNITDIR)/ssock-devd.service'
	$(INSTALL) -m 0644 $(DOCS) '$(DESTDIR)$(DOCDIR)/'
	$(INSTALL) -m 0644 $(CONFIG) '$(DESTDIR)$(DOCDIR)/examples/devd.toml'
	@if [ -e '$(DESTDIR)$(SYSCONFDIR)/ssock/devd.toml' ]; then \
	  echo "kept the existing $(DESTDIR)$(SYSCONFDIR)/ssock/devd.toml (example: $(DOCDIR)/examples/devd.toml)"; \
	else \
	  echo "$(INSTALL) -m 0644 $(CONFIG) '$(DESTDIR)$(SYSCONFDIR)/ssock/devd.toml'"; \
	  $(INSTALL) -m 0644 $(CONFIG) '$(DESTDIR)$(SYSCONFDIR)/ssock/devd.toml'; \
	fi

uninstall: check-prefix
	rm -f $(addprefix '$(DESTDIR)$(BINDIR)'/,$(BINS)) '$(DESTDIR)$(SHIMDIR)/$(SHIM)' \
	  '$(DESTDIR)$(UNITDIR)/ssock-devd.service' \
	  $(addprefix '$(DESTDIR)$(DOCDIR)'/,$(notdir $(DOCS))) '$(DESTDIR)$(DOCDIR)/examples/devd.toml'
	@rmdir '$(DESTDIR)$(SHIMDIR)' '$(DESTDIR)$(DOCDIR)/examples' '$(DESTDIR)$(DOCDIR)' 2>/dev/null || true
	@if [ -e '$(DESTDIR)$(SYSCONFDIR)/ssock/devd.toml' ]; then \
	  echo "kept $(DESTDIR)$(SYSCONFDIR)/ssock/devd.toml"; fi

deb: build
	PROFILE='$(PROFILE)' CARGO_TARGET_DIR='$(CARGO_TARGET_DIR)' BUILD_DIR='$(BUILD_DIR)' \
	  '$(SRC)/packaging/build-deb.sh' $(if $(DEB_OUT),'$(DEB_OUT)')
