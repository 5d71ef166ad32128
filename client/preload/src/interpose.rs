//! `interpose!`: the one place an interposed libc call is declared. Each
//! entry of its table (lib.rs) generates the exported
//! `#[no_mangle] pub unsafe extern "C" fn`, whose body is one call to the
//! entry's handler with the same arguments, and the call's field in
//! `Real`, the table of the real libc functions (`real::get`), resolved
//! with `dlsym(RTLD_NEXT)`. Adding an interposed call: a line in the table,
//! its handler, and its name in `exports.map`.
//!
//! An entry is `name(arg: Type, ...) -> Ret => handler` followed by one of
//! - `;`: the real function has this signature, and libc must have it;
//! - `, real as Type;`: the real function has another C prototype (libc's
//!   variadic `fcntl`, `ioctl`: the exported one takes the optional
//!   argument as a fixed one);
//! - `, real if present;`: a libc may lack it (`Real`'s field is an
//!   `Option`);
//! - `, no real;`: no real function of its own (the handler goes through
//!   another call's: `recv` through `recvfrom`'s).
//!
//! Never here: anything a call does. The handler does the work; the macro
//! writes only the C-facing function and the real entry.

/// See the module doc.
macro_rules! interpose {
    // Every entry exported: the table of the real functions.
    (@munch [$($real:tt)*]) => {
        interpose!(@real $($real)*);
    };
    (@munch [$($real:tt)*]
        $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? => $h:path;
        $($rest:tt)*
    ) => {
        interpose!(@export $name($($a: $t),*) $(-> $r)? => $h);
        interpose!(@munch
            [$($real)* [$name, unsafe extern "C" fn($($t),*) $(-> $r)?, required]]
            $($rest)*);
    };
    (@munch [$($real:tt)*]
        $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? => $h:path, real as $rt:ty;
        $($rest:tt)*
    ) => {
        interpose!(@export $name($($a: $t),*) $(-> $r)? => $h);
        interpose!(@munch [$($real)* [$name, $rt, required]] $($rest)*);
    };
    (@munch [$($real:tt)*]
        $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? => $h:path, real if present;
        $($rest:tt)*
    ) => {
        interpose!(@export $name($($a: $t),*) $(-> $r)? => $h);
        interpose!(@munch
            [$($real)* [$name, unsafe extern "C" fn($($t),*) $(-> $r)?, optional]]
            $($rest)*);
    };
    (@munch [$($real:tt)*]
        $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? => $h:path, no real;
        $($rest:tt)*
    ) => {
        interpose!(@export $name($($a: $t),*) $(-> $r)? => $h);
        interpose!(@munch [$($real)*] $($rest)*);
    };

    // The exported function: one call to its handler.
    (@export $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? => $h:path) => {
        #[doc = concat!(
            "`", stringify!($name), "`, interposed: served by `", stringify!($h), "`."
        )]
        ///
        /// # Safety
        #[doc = concat!(
            "The C contract of `", stringify!($name), "` (its manual page), ",
            "which the handler takes on unchanged."
        )]
        #[no_mangle]
        pub unsafe extern "C" fn $name($($a: $t),*) $(-> $r)? {
            // SAFETY: the arguments are the application's own, under the
            // C contract of this call (this function's precondition); the
            // handler's precondition is that same contract.
            unsafe { $h($($a),*) }
        }
    };

    // The table of the real functions and its resolution.
    (@real $([$name:ident, $fty:ty, $kind:ident])*) => {
        /// The real libc functions, one per interposed call that has its
        /// own (`interpose!`); resolved once by [`real::get`].
        pub(crate) struct Real {
            $(pub $name: interpose!(@field $kind $fty),)*
        }

        impl Real {
            /// Resolves every function with `dlsym(RTLD_NEXT)` (the first
            /// library after this one that has it: libc's). Panics if libc
            /// lacks a required one.
            pub(crate) fn resolve() -> Real {
                Real {
                    $($name: interpose!(@resolve $kind $name $fty),)*
                }
            }
        }
    };
    (@field required $fty:ty) => { $fty };
    (@field optional $fty:ty) => { Option<$fty> };
    (@resolve required $name:ident $fty:ty) => {{
        let p = $crate::real::sym(concat!(stringify!($name), "\0"));
        // SAFETY: p is not null (`sym` checked) and is dlsym's address of
        // the libc function of this name, whose C prototype is exactly
        // the type it becomes (the entry's signature, or its `real as`).
        unsafe { std::mem::transmute::<*mut libc::c_void, $fty>(p) }
    }};
    (@resolve optional $name:ident $fty:ty) => {{
        let p = $crate::real::sym_opt(concat!(stringify!($name), "\0"));
        // SAFETY: as for a required function, once p is known not null.
        (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut libc::c_void, $fty>(p) })
    }};

    // The table itself (lib.rs).
    ($($entries:tt)*) => {
        interpose!(@munch [] $($entries)*);
    };
}
