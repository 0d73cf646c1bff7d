-- The Go commit whose toolchain a build was tested against (subrepo builds paired with a
-- toolchain build of the Go repo); NULL for builds that use no other repo's toolchain.
ALTER TABLE builds ADD COLUMN go_rev TEXT;
